use std::hint::black_box;
use vmm::memory::shared_bitmap::SharedBitmap;
fn main() {
    let mut s = SharedBitmap::new(1 << 20);
    for _ in 0..50_000_000u64 {
        black_box(s.set_range(262144, 1, true));
        black_box(s.set_range(262144, 1, false));
    }
}
