//! The exit status of the commands that run a VM.

use kiln_vmm::ExitReason;

/// Exit status when the guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 2;
/// Exit status when a vCPU failed.
pub const EXIT_VCPU_ERROR: i32 = 3;

/// The exit status of `kiln run` and `kiln vmm` when the guest ended.
pub fn status(reason: ExitReason) -> i32 {
    match reason {
        ExitReason::Reboot | ExitReason::Poweroff => {
            log::info!("guest ended: {reason:?}");
            0
        }
        ExitReason::GuestPanic => {
            eprintln!("kiln: the guest kernel panicked");
            EXIT_GUEST_PANIC
        }
        ExitReason::VcpuError(e) => {
            eprintln!("kiln: vCPU error: {e}");
            EXIT_VCPU_ERROR
        }
        ExitReason::Migrated => {
            eprintln!("kiln: the microVM was migrated; it runs at the destination now");
            0
        }
    }
}
