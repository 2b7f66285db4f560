use super::serial::serial_file;

#[test]
fn the_serial_file_may_not_be_a_kernel_pseudo_file() {
    for pseudo in [
        "/proc/self/comm",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ] {
        let before = std::fs::read_to_string(pseudo).ok();
        let Err(err) = serial_file(std::path::Path::new(pseudo)) else {
            panic!("{pseudo} accepted as the serial console");
        };
        assert!(
            crate::error_chain(&err).contains("procfs or sysfs"),
            "{pseudo}: {err}"
        );
        assert_eq!(
            std::fs::read_to_string(pseudo).ok(),
            before,
            "{pseudo} changed"
        );
    }
    // An ordinary file is emptied, as before.
    let path = crate::test_util::scratch_path("serial-file");
    std::fs::write(&path, "old output").unwrap();
    drop(serial_file(&path).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    let _ = std::fs::remove_file(&path);
}
