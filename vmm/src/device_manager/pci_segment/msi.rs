//! MSI-X vectors routed through KVM's irqchip by irqfd.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::{EventFd, MsiRoute, Vm};
use log::{debug, warn};
use vm_device::{InterruptError, MsiMessage, MsiVectors};

/// GSIs below this belong to the irqchip's IOAPIC / PIC pins.
pub(super) const FIRST_MSI_GSI: u32 = 24;
/// KVM's default routing table size bounds the GSIs a VM can route.
pub(super) const GSI_LIMIT: u32 = 1024;

/// The VM's MSI routing table: KVM takes it whole, so every change rewrites
/// it from this copy.
pub struct MsiRouter {
    vm: Arc<dyn Vm>,
    table: Mutex<RouterTable>,
}

#[derive(Default)]
pub(super) struct RouterTable {
    routes: BTreeMap<u32, MsiRoute>,
    taken: std::collections::BTreeSet<u32>,
}

impl MsiRouter {
    pub(crate) fn new(vm: Arc<dyn Vm>) -> Self {
        MsiRouter {
            vm,
            table: Mutex::new(RouterTable::default()),
        }
    }

    pub(super) fn table(&self) -> MutexGuard<'_, RouterTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn allocate(&self, count: u16) -> Option<Vec<u32>> {
        let mut t = self.table();
        let free: Vec<u32> = (FIRST_MSI_GSI..GSI_LIMIT)
            .filter(|g| !t.taken.contains(g))
            .take(usize::from(count))
            .collect();
        (free.len() == usize::from(count)).then(|| {
            t.taken.extend(&free);
            free
        })
    }

    pub(super) fn release(&self, gsis: &[u32]) {
        let mut t = self.table();
        for g in gsis {
            t.taken.remove(g);
            t.routes.remove(g);
        }
        let routes: Vec<MsiRoute> = t.routes.values().copied().collect();
        if let Err(e) = self.vm.set_msi_routes(&routes) {
            warn!("cannot drop MSI routes: {e}");
        }
    }

    /// Replaces the routes of the IOAPIC's pins (GSIs below
    /// `FIRST_MSI_GSI`, which MSI-X never takes): on a split irqchip KVM
    /// scans them for the level-triggered vectors whose EOIs it reports
    /// (`KVM_EXIT_IOAPIC_EOI`). The table is unchanged on failure.
    pub fn set_ioapic_routes(
        &self,
        routes: &[MsiRoute],
    ) -> Result<(), hypervisor::HypervisorError> {
        let mut t = self.table();
        let mut next = t.routes.clone();
        next.retain(|gsi, _| *gsi >= FIRST_MSI_GSI);
        for route in routes.iter().filter(|r| r.gsi < FIRST_MSI_GSI) {
            next.insert(route.gsi, *route);
        }
        let all: Vec<MsiRoute> = next.values().copied().collect();
        self.vm.set_msi_routes(&all)?;
        t.routes = next;
        Ok(())
    }

    /// The routes KVM has now, by GSI.
    pub fn routes(&self) -> Vec<MsiRoute> {
        self.table().routes.values().copied().collect()
    }

    /// Sets or clears one GSI's route; the table is unchanged on failure.
    pub(super) fn set(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut t = self.table();
        let previous = match message {
            Some(m) => t.routes.insert(
                gsi,
                MsiRoute {
                    gsi,
                    address: m.address,
                    data: m.data,
                },
            ),
            None => t.routes.remove(&gsi),
        };
        let routes: Vec<MsiRoute> = t.routes.values().copied().collect();
        self.vm.set_msi_routes(&routes).map_err(|e| {
            match previous {
                Some(p) => t.routes.insert(gsi, p),
                None => t.routes.remove(&gsi),
            };
            InterruptError::Route(crate::error_chain(&e))
        })
    }
}

/// One device's MSI-X vectors: a GSI and an eventfd each; the eventfd is
/// bound to its GSI by irqfd while the vector is routed.
pub(super) struct KvmMsiVectors {
    router: Arc<MsiRouter>,
    gsis: Vec<u32>,
    fds: Vec<EventFd>,
    bound: Mutex<Vec<bool>>,
}

impl KvmMsiVectors {
    pub(super) fn new(router: Arc<MsiRouter>, count: u16) -> Result<Self, String> {
        let gsis = router
            .allocate(count)
            .ok_or_else(|| format!("no {count} free GSIs"))?;
        let fds = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                router.release(&gsis);
                format!("cannot create eventfds: {e}")
            })?;
        Ok(KvmMsiVectors {
            router,
            gsis,
            fds,
            bound: Mutex::new(vec![false; usize::from(count)]),
        })
    }
}

impl MsiVectors for KvmMsiVectors {
    fn count(&self) -> u16 {
        // As many as were asked for, in a u16.
        u16::try_from(self.gsis.len()).unwrap_or(u16::MAX)
    }

    fn notifier(&self, vector: u16) -> Option<RawFd> {
        self.fds.get(usize::from(vector)).map(AsRawFd::as_raw_fd)
    }

    fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let i = usize::from(vector);
        let (Some(&gsi), Some(fd)) = (self.gsis.get(i), self.fds.get(i)) else {
            return Err(InterruptError::NoSuchVector(vector));
        };
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        debug!("MSI vector {vector} (GSI {gsi}) routed to {message:?}");
        match message {
            Some(_) => {
                self.router.set(gsi, message)?;
                if !bound[i] {
                    // An interrupt raised while unbound waits in the eventfd;
                    // KVM delivers it as soon as the irqfd is bound.
                    self.router
                        .vm
                        .register_irqfd(fd, gsi)
                        .map_err(|e| InterruptError::Route(crate::error_chain(&e)))?;
                    bound[i] = true;
                }
            }
            None => {
                if bound[i] {
                    self.router
                        .vm
                        .unregister_irqfd(fd, gsi)
                        .map_err(|e| InterruptError::Route(crate::error_chain(&e)))?;
                    bound[i] = false;
                }
                self.router.set(gsi, None)?;
            }
        }
        Ok(())
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &b) in bound.iter().enumerate() {
            if b {
                let _ = self.router.vm.unregister_irqfd(&self.fds[i], self.gsis[i]);
            }
        }
        self.router.release(&self.gsis);
    }
}
