//! The built-in allow-lists, as data: one list of [`Allow`] entries per
//! [`ThreadKind`], built from shared groups. docs/seccomp.md explains each
//! entry. To let a thread kind do more (say, a new migration thread kind),
//! add a group or entries here; [`allowed`] is the only place that says
//! what each kind may do.

use kvm_bindings::*;
use seccompiler::{SeccompCmpOp, SeccompCondition};

use crate::{condition, ThreadKind};

/// One allow-list entry.
#[derive(Clone, Copy, Debug)]
pub enum Allow {
    /// The syscall, whatever its arguments.
    Any(i64),
    /// The syscall when argument `index` is one of the values.
    ArgIn(i64, u8, &'static [u64]),
    /// The syscall when argument `index` has none of the bits of the mask
    /// set (mmap and mprotect without `PROT_EXEC`).
    NoBits(i64, u8, u64),
    /// The syscall when argument `index` is this process's id (as the
    /// filters are compiled: at startup, in the VMM process itself).
    OwnProcess(i64, u8),
}

impl Allow {
    /// The syscall number and the alternative condition sets that allow
    /// it (empty: allowed outright).
    pub(crate) fn rules(&self) -> (i64, Vec<Vec<SeccompCondition>>) {
        match *self {
            Allow::Any(nr) => (nr, Vec::new()),
            Allow::ArgIn(nr, index, values) => (
                nr,
                values
                    .iter()
                    .map(|v| vec![condition(index, SeccompCmpOp::Eq, *v)])
                    .collect(),
            ),
            Allow::NoBits(nr, index, mask) => (
                nr,
                vec![vec![condition(index, SeccompCmpOp::MaskedEq(mask), 0)]],
            ),
            Allow::OwnProcess(nr, index) => (
                nr,
                vec![vec![condition(
                    index,
                    SeccompCmpOp::Eq,
                    u64::from(std::process::id()),
                )]],
            ),
        }
    }

    /// The syscall number.
    pub fn syscall(&self) -> i64 {
        match *self {
            Allow::Any(nr)
            | Allow::ArgIn(nr, ..)
            | Allow::NoBits(nr, ..)
            | Allow::OwnProcess(nr, ..) => nr,
        }
    }
}

use libc::*;
use Allow::{Any, ArgIn, NoBits, OwnProcess};

// ioctl request numbers (asm-generic/ioctl.h encoding).
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const NONE: u64 = 0;
const W: u64 = 1;
const R: u64 = 2;
const RW: u64 = 3;
const KVMIO: u64 = 0xAE;
const fn kvm_io(nr: u64) -> u64 {
    ioc(NONE, KVMIO, nr, 0)
}
const fn kvm_r<T>(nr: u64) -> u64 {
    ioc(R, KVMIO, nr, std::mem::size_of::<T>())
}
const fn kvm_w<T>(nr: u64) -> u64 {
    ioc(W, KVMIO, nr, std::mem::size_of::<T>())
}
const fn kvm_rw<T>(nr: u64) -> u64 {
    ioc(RW, KVMIO, nr, std::mem::size_of::<T>())
}

/// `KVM_RUN`.
pub const KVM_RUN: u64 = kvm_io(0x80);
const KVM_GET_MSR_INDEX_LIST: u64 = kvm_rw::<kvm_msr_list>(0x02);
const KVM_CHECK_EXTENSION: u64 = kvm_io(0x03);
const KVM_GET_REGS: u64 = kvm_r::<kvm_regs>(0x81);
const KVM_GET_SREGS: u64 = kvm_r::<kvm_sregs>(0x83);
const KVM_GET_MSRS: u64 = kvm_rw::<kvm_msrs>(0x88);
const KVM_GET_FPU: u64 = kvm_r::<kvm_fpu>(0x8c);
const KVM_GET_LAPIC: u64 = kvm_r::<kvm_lapic_state>(0x8e);
const KVM_GET_CPUID2: u64 = kvm_rw::<kvm_cpuid2>(0x91);
const KVM_GET_MP_STATE: u64 = kvm_r::<kvm_mp_state>(0x98);
const KVM_GET_VCPU_EVENTS: u64 = kvm_r::<kvm_vcpu_events>(0x9f);
const KVM_GET_DEBUGREGS: u64 = kvm_r::<kvm_debugregs>(0xa1);
const KVM_GET_TSC_KHZ: u64 = kvm_io(0xa3);
const KVM_GET_XSAVE: u64 = kvm_r::<kvm_xsave>(0xa4);
const KVM_GET_XCRS: u64 = kvm_r::<kvm_xcrs>(0xa6);
const KVM_KVMCLOCK_CTRL: u64 = kvm_io(0xad);
const KVM_GET_IRQCHIP: u64 = kvm_rw::<kvm_irqchip>(0x62);
const KVM_GET_CLOCK: u64 = kvm_r::<kvm_clock_data>(0x7c);
const KVM_GET_PIT2: u64 = kvm_r::<kvm_pit_state2>(0x9f);
const KVM_GET_DIRTY_LOG: u64 = kvm_w::<kvm_dirty_log>(0x42);
const KVM_SET_USER_MEMORY_REGION: u64 = kvm_w::<kvm_userspace_memory_region>(0x46);

// Terminal (stdin in raw mode, restored at exit).
const TCGETS_: u64 = 0x5401;
const TCSETS_: u64 = 0x5402;
const FIONBIO_: u64 = 0x5421;

/// userfaultfd ioctls (linux/userfaultfd.h) that serve page faults.
/// (`UFFDIO_API` and `UFFDIO_REGISTER` are made on the main thread, before
/// any filter, when the restored guest's memory is registered.)
const UFFDIO: u64 = 0xAA;
const UFFDIO_WAKE: u64 = ioc(R, UFFDIO, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(RW, UFFDIO, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(RW, UFFDIO, 0x04, 32);

const PROT_EXEC_: u64 = PROT_EXEC as u64;

/// What every Kiln thread does: memory (the allocator; never executable
/// mappings), locks and condition variables, eventfd reads and writes,
/// epoll, logging, time, signals (the vCPU kick, returning from
/// handlers), and ending the thread or process.
const COMMON: &[Allow] = &[
    Any(SYS_read),
    Any(SYS_write),
    Any(SYS_readv),
    Any(SYS_writev),
    Any(SYS_close),
    Any(SYS_futex),
    NoBits(SYS_mmap, 2, PROT_EXEC_),
    NoBits(SYS_mprotect, 2, PROT_EXEC_),
    Any(SYS_munmap),
    Any(SYS_mremap),
    ArgIn(SYS_madvise, 2, &[MADV_DONTNEED as u64, MADV_FREE as u64]),
    Any(SYS_brk),
    Any(SYS_rt_sigreturn),
    Any(SYS_rt_sigprocmask),
    Any(SYS_sigaltstack),
    Any(SYS_sched_yield),
    Any(SYS_sched_getaffinity),
    Any(SYS_clock_gettime),
    Any(SYS_clock_nanosleep),
    Any(SYS_nanosleep),
    Any(SYS_gettid),
    Any(SYS_getpid),
    // std seeds each thread's HashMap hasher (RandomState) with getrandom
    // on the thread's first map: a vCPU activating a device makes one.
    // Without it std falls back to opening /dev/urandom, then panics.
    Any(SYS_getrandom),
    Any(SYS_epoll_wait),
    Any(SYS_epoll_pwait),
    Any(SYS_epoll_ctl),
    Any(SYS_exit),
    Any(SYS_exit_group),
    // Signals to threads of this process only (the vCPU kick, abort).
    OwnProcess(SYS_tgkill, 0),
    Any(SYS_rseq),
    Any(SYS_set_robust_list),
    Any(SYS_statx),
    Any(SYS_fstat),
    Any(SYS_newfstatat),
    Any(SYS_lseek),
    ArgIn(
        SYS_fcntl,
        1,
        &[
            F_GETFL as u64,
            F_SETFL as u64,
            F_GETFD as u64,
            F_SETFD as u64,
            F_DUPFD_CLOEXEC as u64,
        ],
    ),
];

/// Setting up a device worker's loop and its rate limiters (eventfds,
/// epoll, timerfds): done by the thread that activates the device (a vCPU)
/// and by the worker.
const WORKER_SETUP: &[Allow] = &[
    Any(SYS_eventfd2),
    Any(SYS_epoll_create1),
    Any(SYS_timerfd_create),
    Any(SYS_timerfd_settime),
    Any(SYS_timerfd_gettime),
];

/// Starting a thread and installing its filter: what the spawner does,
/// and what a new thread does before its filter is in place.
const THREAD_START: &[Allow] = &[
    Any(SYS_clone3),
    Any(SYS_clone),
    ArgIn(
        SYS_prctl,
        0,
        &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64],
    ),
    Any(SYS_seccomp),
];

const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    // Saving a parked vCPU for a snapshot (on its own thread).
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_MSRS,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_GET_TSC_KHZ,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
    KVM_KVMCLOCK_CTRL,
];

const VCPU: &[Allow] = &[ArgIn(SYS_ioctl, 1, VCPU_IOCTLS)];

const API_IOCTLS: &[u64] = &[
    // set_nonblocking on accepted connections.
    FIONBIO_,
    KVM_GET_IRQCHIP,
    KVM_GET_CLOCK,
    KVM_GET_PIT2,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_CHECK_EXTENSION,
];

/// The API server: its Unix socket (accept, poll), and what requests do:
/// open files (logger, metrics, drives, snapshots, serial output), write
/// snapshots, stat paths.
const API: &[Allow] = &[
    Any(SYS_accept4),
    Any(SYS_poll),
    Any(SYS_ppoll),
    Any(SYS_recvfrom),
    Any(SYS_sendto),
    Any(SYS_recvmsg),
    Any(SYS_sendmsg),
    Any(SYS_shutdown),
    ArgIn(SYS_socket, 0, &[AF_UNIX as u64]),
    Any(SYS_openat),
    Any(SYS_pread64),
    Any(SYS_pwrite64),
    Any(SYS_ftruncate),
    Any(SYS_fallocate),
    Any(SYS_fsync),
    Any(SYS_fdatasync),
    Any(SYS_unlink),
    Any(SYS_unlinkat),
    Any(SYS_rename),
    Any(SYS_renameat),
    Any(SYS_renameat2),
    Any(SYS_mkdirat),
    ArgIn(SYS_ioctl, 1, API_IOCTLS),
];

/// The main thread's event loop, then tear-down: stdin to the serial
/// port, the terminal restored, the API socket removed.
const VMM: &[Allow] = &[
    // The event loop's epoll is made once it runs.
    Any(SYS_epoll_create1),
    ArgIn(SYS_ioctl, 1, &[TCGETS_, TCSETS_]),
    Any(SYS_unlink),
    Any(SYS_unlinkat),
    // A migration's destination sends its Ack from the event loop once the
    // VM runs (std writes sockets with send(MSG_NOSIGNAL)): connected
    // sockets only, no destination address.
    ArgIn(SYS_sendto, 4, &[0]),
];

/// Disk I/O: positioned reads and writes, flushes.
const BLOCK: &[Allow] = &[
    Any(SYS_pread64),
    Any(SYS_pwrite64),
    Any(SYS_fsync),
    Any(SYS_fdatasync),
];

const BLOCK_IO_URING: &[Allow] = &[
    Any(SYS_io_uring_enter),
    Any(SYS_io_uring_register),
    Any(SYS_io_uring_setup),
    Any(SYS_fsync),
    Any(SYS_fdatasync),
];

/// TAP I/O is `read`/`write` on the TAP fd (opened and configured before
/// the guest runs).
const NET: &[Allow] = &[];

/// The host side of vsock: Unix sockets only.
const VSOCK: &[Allow] = &[
    ArgIn(SYS_socket, 0, &[AF_UNIX as u64]),
    // Accepted host connections are made non-blocking.
    ArgIn(SYS_ioctl, 1, &[FIONBIO_]),
    Any(SYS_connect),
    Any(SYS_accept4),
    Any(SYS_recvfrom),
    Any(SYS_sendto),
    Any(SYS_shutdown),
    Any(SYS_getsockopt),
];

/// Entropy for the guest is `getrandom`, already in [`COMMON`].
const RNG: &[Allow] = &[];

/// Giving inflated pages back to the host is `madvise(MADV_DONTNEED)`,
/// already in [`COMMON`].
const BALLOON: &[Allow] = &[];

const METRICS: &[Allow] = &[];

/// The userfaultfd threads of a restored VM: the in-process handler polls
/// the userfaultfd, reads its events and fills pages (copy, zero page,
/// wake); the watch polls the external handler's pidfd and socket. Both
/// restore the terminal (`TCSETS`) before ending the process when the
/// handler is lost.
const UFFD: &[Allow] = &[
    Any(SYS_poll),
    Any(SYS_ppoll),
    // The watch's and handler's non-blocking recv on the handler socket.
    Any(SYS_recvfrom),
    ArgIn(
        SYS_ioctl,
        1,
        &[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, TCGETS_, TCSETS_],
    ),
];

/// The migration sender and receiver: the only kind with TCP. The sender
/// connects (`connect_timeout`: non-blocking connect, poll, `SO_ERROR`),
/// sets `TCP_NODELAY` and timeouts, and drives the VM like a snapshot
/// does (dirty log on and read, the VM's irqchip, PIT and clock saved);
/// the receiver accepts on a socket the main thread bound and fills freshly
/// mapped guest memory. Host names are resolved before this thread (by
/// `kiln migrate send`, or by the main thread for `--listen`).
const MIGRATION: &[Allow] = &[
    ArgIn(
        SYS_socket,
        0,
        &[AF_UNIX as u64, AF_INET as u64, AF_INET6 as u64],
    ),
    Any(SYS_connect),
    Any(SYS_accept4),
    Any(SYS_poll),
    Any(SYS_ppoll),
    Any(SYS_recvfrom),
    Any(SYS_sendto),
    Any(SYS_shutdown),
    Any(SYS_getsockopt),
    Any(SYS_setsockopt),
    ArgIn(SYS_ioctl, 1, MIGRATION_IOCTLS),
];

const MIGRATION_IOCTLS: &[u64] = &[
    // connect_timeout's non-blocking connect.
    FIONBIO_,
    KVM_GET_IRQCHIP,
    KVM_GET_CLOCK,
    KVM_GET_PIT2,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_CHECK_EXTENSION,
];

/// The lists a kind is made of.
fn groups(kind: ThreadKind) -> Vec<&'static [Allow]> {
    match kind {
        ThreadKind::Vmm => vec![COMMON, VMM],
        ThreadKind::Api => vec![COMMON, API],
        // A device the guest activates gets its worker's eventfds, epoll
        // and timers here (the thread itself comes from the spawner).
        ThreadKind::Vcpu => vec![COMMON, WORKER_SETUP, VCPU],
        ThreadKind::Block => vec![COMMON, WORKER_SETUP, BLOCK],
        ThreadKind::BlockIoUring => vec![COMMON, WORKER_SETUP, BLOCK_IO_URING],
        ThreadKind::Net => vec![COMMON, WORKER_SETUP, NET],
        ThreadKind::Vsock => vec![COMMON, WORKER_SETUP, VSOCK],
        ThreadKind::Rng => vec![COMMON, WORKER_SETUP, RNG],
        ThreadKind::Balloon => vec![COMMON, WORKER_SETUP, BALLOON],
        ThreadKind::Metrics => vec![COMMON, METRICS],
        ThreadKind::Uffd => vec![COMMON, UFFD],
        ThreadKind::Migration => vec![COMMON, MIGRATION],
        // Everything the threads it starts may do, and starting them.
        ThreadKind::Spawner => {
            let mut g = vec![THREAD_START];
            for k in SPAWNED {
                g.extend(groups(k));
            }
            g
        }
        ThreadKind::MigrationSpawner => {
            let mut g = vec![THREAD_START];
            g.extend(groups(ThreadKind::Migration));
            g
        }
    }
}

/// The kinds of device and metrics threads, started at run time through
/// the spawner.
pub const SPAWNED: [ThreadKind; 7] = [
    ThreadKind::Block,
    ThreadKind::BlockIoUring,
    ThreadKind::Net,
    ThreadKind::Vsock,
    ThreadKind::Rng,
    ThreadKind::Balloon,
    ThreadKind::Metrics,
];

/// The spawner that starts `kind`'s threads for filtered threads, if any:
/// [`ThreadKind::Spawner`] for the [`SPAWNED`] kinds,
/// [`ThreadKind::MigrationSpawner`] for the migration sender (started by
/// `PUT /migrate` on the API thread). The userfaultfd threads have none:
/// they start on the main thread during a restore, before its filter.
pub fn spawner_for(kind: ThreadKind) -> Option<ThreadKind> {
    if SPAWNED.contains(&kind) {
        Some(ThreadKind::Spawner)
    } else if kind == ThreadKind::Migration {
        Some(ThreadKind::MigrationSpawner)
    } else {
        None
    }
}

/// The built-in allow-list of `kind`.
pub fn allowed(kind: ThreadKind) -> Vec<Allow> {
    groups(kind).concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Printed by a C program including linux/kvm.h, linux/if_tun.h,
        // linux/userfaultfd.h and sys/ioctl.h (x86_64).
        for (ours, header, name) in [
            (KVM_RUN, 0xae80, "KVM_RUN"),
            (KVM_GET_REGS, 0x8090ae81, "KVM_GET_REGS"),
            (KVM_GET_SREGS, 0x8138ae83, "KVM_GET_SREGS"),
            (KVM_GET_MSRS, 0xc008ae88, "KVM_GET_MSRS"),
            (KVM_GET_FPU, 0x81a0ae8c, "KVM_GET_FPU"),
            (KVM_GET_LAPIC, 0x8400ae8e, "KVM_GET_LAPIC"),
            (KVM_GET_CPUID2, 0xc008ae91, "KVM_GET_CPUID2"),
            (KVM_GET_MP_STATE, 0x8004ae98, "KVM_GET_MP_STATE"),
            (KVM_GET_VCPU_EVENTS, 0x8040ae9f, "KVM_GET_VCPU_EVENTS"),
            (KVM_GET_DEBUGREGS, 0x8080aea1, "KVM_GET_DEBUGREGS"),
            (KVM_GET_TSC_KHZ, 0xaea3, "KVM_GET_TSC_KHZ"),
            (KVM_GET_XSAVE, 0x9000aea4, "KVM_GET_XSAVE"),
            (KVM_GET_XCRS, 0x8188aea6, "KVM_GET_XCRS"),
            (KVM_KVMCLOCK_CTRL, 0xaead, "KVM_KVMCLOCK_CTRL"),
            (KVM_GET_IRQCHIP, 0xc208ae62, "KVM_GET_IRQCHIP"),
            (KVM_GET_CLOCK, 0x8030ae7c, "KVM_GET_CLOCK"),
            (KVM_GET_PIT2, 0x8070ae9f, "KVM_GET_PIT2"),
            (KVM_GET_DIRTY_LOG, 0x4010ae42, "KVM_GET_DIRTY_LOG"),
            (
                KVM_SET_USER_MEMORY_REGION,
                0x4020ae46,
                "KVM_SET_USER_MEMORY_REGION",
            ),
            (KVM_GET_MSR_INDEX_LIST, 0xc004ae02, "KVM_GET_MSR_INDEX_LIST"),
            (KVM_CHECK_EXTENSION, 0xae03, "KVM_CHECK_EXTENSION"),
            (UFFDIO_WAKE, 0x8010aa02, "UFFDIO_WAKE"),
            (UFFDIO_COPY, 0xc028aa03, "UFFDIO_COPY"),
            (UFFDIO_ZEROPAGE, 0xc020aa04, "UFFDIO_ZEROPAGE"),
            (TCGETS_, 0x5401, "TCGETS"),
            (TCSETS_, 0x5402, "TCSETS"),
            (FIONBIO_, 0x5421, "FIONBIO"),
        ] {
            assert_eq!(ours, header, "{name}");
        }
    }
}
