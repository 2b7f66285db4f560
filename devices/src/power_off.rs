//! A one-register power-off port: any write ends the VM (the value is the
//! guest's exit code, as with QEMU's isa-debug-exit).

use vm_device::BusDevice;

pub struct PowerOffPort {
    on_power_off: Box<dyn Fn(u8) + Send + Sync>,
}

impl PowerOffPort {
    pub fn new(on_power_off: Box<dyn Fn(u8) + Send + Sync>) -> Self {
        PowerOffPort { on_power_off }
    }
}

impl BusDevice for PowerOffPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        (self.on_power_off)(data.first().copied().unwrap_or(0));
    }
}
