//! The API's pre-boot flow (`kiln vmm`): the API thread collects the
//! configuration (a [`kiln_api::PreBootVm`]); on `InstanceStart` or
//! `PUT /snapshot/load` its [`Starter`] (made by [`channel`]) translates
//! and checks the request, sends it to the main thread and blocks. The main
//! thread ([`StartRequests::wait`]) builds the VM as a [`Controller`] and
//! answers:
//!
//! - an error if the VM could not be built; it then waits for the next
//!   request (the API answers 400 and stays "Not started");
//! - the VM's control once every vCPU thread is running
//!   ([`Reply::started`], from [`Controller::run`]'s `on_started`); the API
//!   answers 204 and forwards runtime requests to it.

use std::sync::mpsc::{channel as mpsc_channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_api::snapshot::SnapshotLoadParams;
use kiln_api::{Starter, VmControl, VmResources};
use kiln_vmm::VmConfig;

use crate::config::{open_console, to_vm_config, Console};
use crate::controller::Controller;
use crate::error::{chain, ApiStopped};
use crate::restore::{prepare, Restore};
use crate::running::RunningVm;

/// How the main thread should make the VM.
enum Make {
    /// Boot it (`InstanceStart`), its console going to the given output.
    Boot(Box<VmConfig>, Console),
    /// Restore it (`PUT /snapshot/load`).
    Restore(Box<Restore>),
}

/// What the API thread sends the main thread: what to make, the
/// configuration it comes from, and where to answer.
type StartRequest = (Make, VmResources, SyncSender<Result<RunningVm, String>>);

/// Where the main thread answers the API once the VM runs.
pub struct Reply(SyncSender<Result<RunningVm, String>>);

impl Reply {
    /// The VM runs: the API answers its request and drives `vm` from now on.
    pub fn started(self, vm: RunningVm) {
        let _ = self.0.send(Ok(vm));
    }
}

/// The main thread's end of the API's start requests.
pub struct StartRequests(Receiver<StartRequest>);

/// The API side of `InstanceStart` and `PUT /snapshot/load`.
struct ChannelStarter(Mutex<Sender<StartRequest>>);

/// A [`Starter`] for the API and the main thread's end of it.
pub fn channel() -> (Box<dyn Starter>, StartRequests) {
    let (tx, rx) = mpsc_channel();
    (Box::new(ChannelStarter(Mutex::new(tx))), StartRequests(rx))
}

impl ChannelStarter {
    fn ask(&self, make: Make, res: VmResources) -> Result<Arc<dyn VmControl>, String> {
        let (reply, answer) = sync_channel(1);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((make, res, reply))
            .map_err(|_| "the VMM thread has stopped".to_string())?;
        match answer.recv() {
            Ok(Ok(vm)) => Ok(Arc::new(vm)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the VM failed while starting its vCPUs".into()),
        }
    }
}

impl Starter for ChannelStarter {
    fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        let config = to_vm_config(res).map_err(|e| e.to_string())?;
        let console = open_console(res.serial.as_ref()).map_err(|e| e.to_string())?;
        self.ask(Make::Boot(Box::new(config), console), res.clone())
    }

    fn restore(&self, p: &SnapshotLoadParams) -> Result<(Arc<dyn VmControl>, VmResources), String> {
        let r = prepare(p).map_err(|e| chain(&e))?;
        let res = r.res.clone();
        let vm = self.ask(Make::Restore(Box::new(r)), res.clone())?;
        Ok((vm, res))
    }
}

impl StartRequests {
    /// Builds VMs as the API asks until one builds; failures go back to
    /// the API. The [`Reply`] is for once the VM runs.
    pub fn wait(&self, start: Instant) -> Result<(Controller, Reply), ApiStopped> {
        loop {
            let (make, res, reply) = self.0.recv().map_err(|_| ApiStopped)?;
            let made = match make {
                Make::Boot(config, console) => {
                    Controller::build(*config, res, console, start).map_err(|e| format!("{e}"))
                }
                Make::Restore(r) => Controller::restore(*r, start).map_err(|e| e.to_string()),
            };
            match made {
                Ok(vm) => return Ok((vm, Reply(reply))),
                Err(e) => {
                    log::warn!("starting the microVM failed: {e}");
                    let _ = reply.send(Err(e));
                }
            }
        }
    }
}
