use std::hint::black_box;
use std::time::Instant;
use vmm::memory::page_states::{FlatBitmap, PageStates};
use vmm::memory::shared_bitmap::SharedBitmap;

fn probe<S: PageStates>(name: &str) {
    let mut s = S::with_pages(1 << 20);
    let base = 262144u64;
    let n = 20_000u64;
    let mut walk = 0.0;
    let mut set = 0.0;
    let mut big = 0.0;
    for _ in 0..n {
        let t = Instant::now();
        for p in (0..512u64).step_by(2) {
            let _ = s.for_each_change::<()>(base + p, 1, false, |a, b| {
                black_box((a, b));
                Ok(())
            });
        }
        walk += t.elapsed().as_nanos() as f64;
        let t = Instant::now();
        for p in (0..512u64).step_by(2) {
            black_box(s.set_range(base + p, 1, true));
        }
        set += t.elapsed().as_nanos() as f64;
        let t = Instant::now();
        let _ = s.for_each_change::<()>(base, 512, false, |a, b| {
            black_box((a, b));
            Ok(())
        });
        big += t.elapsed().as_nanos() as f64;
        let t = Instant::now();
        black_box(s.set_range(base, 512, true));
        black_box(s.set_range(base, 512, false));
        set += t.elapsed().as_nanos() as f64;
    }
    println!(
        "{name}: per iteration 256 single walks {:.0} ns, mixed walk {:.0} ns, set {:.0} ns",
        walk / n as f64,
        big / n as f64,
        set / n as f64
    );
}

fn main() {
    probe::<FlatBitmap>("flat");
    probe::<SharedBitmap>("ours");
    probe::<FlatBitmap>("flat");
    probe::<SharedBitmap>("ours");
}
