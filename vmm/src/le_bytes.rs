//! Little-endian integers at byte offsets of firmware images, ABI pages and
//! tables whose bounds the caller has checked: a read past the end panics,
//! as indexing does.

pub fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes(data, at))
}

pub fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes(data, at))
}

pub fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes(data, at))
}

fn bytes<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    data[at..at + N].try_into().expect("a slice of N bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_width_reads_its_bytes_least_significant_first() {
        let data = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99];
        assert_eq!(u16_at(&data, 1), 0x3322);
        assert_eq!(u32_at(&data, 0), 0x4433_2211);
        assert_eq!(u64_at(&data, 1), 0x9988_7766_5544_3322);
    }

    #[test]
    #[should_panic]
    fn a_read_past_the_end_panics() {
        u32_at(&[0; 4], 1);
    }
}
