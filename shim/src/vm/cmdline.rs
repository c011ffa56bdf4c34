//! Building QEMU's command line and the guest kernel's, as pure functions.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{
    Accel, AgentChannelKind, GuestMemory, VmConfig, AGENT_CHANNEL_PARAM, AGENT_PORT_NAME,
    SHARE_PORT_NAME,
};

/// The id of the memory backend that holds guest RAM when it is file-backed. Snapshots
/// name RAM blocks by it, so a template and its clones must agree on it.
const RAM_BACKEND_ID: &str = "ram0";

/// QEMU's `-sandbox` setting: seccomp on, with every optional group denied.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The ids QEMU knows devices by (QMP talks about them).
pub const SCSI_CONTROLLER_ID: &str = "scsi0";
pub const SCSI_BUS: &str = "scsi0.0";

/// The fd numbers QEMU is handed everything at: it opens nothing of the host by name but
/// its binary, libraries, firmware, kernel, initramfs and memory file (see `jail.rs`).
pub mod fds {
    use std::os::fd::RawFd;

    /// Listening sockets: QMP, the agent's virtio-serial port, the file share's port.
    pub const QMP: RawFd = 3;
    pub const AGENT: RawFd = 4;
    pub const SHARE: RawFd = 5;
    /// The console log file, open for writing.
    pub const CONSOLE: RawFd = 6;
    /// /dev/kvm, under KVM.
    pub const KVM: RawFd = 7;
    /// /dev/vhost-vsock, with the vsock agent channel.
    pub const VHOST_VSOCK: RawFd = 8;
    /// NIC `i`'s tap is at `TAP0 + i`.
    pub const TAP0: RawFd = 10;

    /// QEMU fd sets (`-add-fd`) for files it opens by `/dev/fdset/N` path.
    pub const CONSOLE_SET: u32 = 1;
    pub const KVM_SET: u32 = 2;
}

/// The host-side paths of a VM's state dir. QEMU sees none of them: the shim makes each
/// and hands QEMU an fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatePaths {
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// The pod file share's virtio-serial port; the pod's file server connects to it.
    pub share_socket: PathBuf,
    pub console_log: PathBuf,
    pub qemu_stderr: PathBuf,
    /// An empty dir QEMU's jail root is mounted on, in QEMU's own mount namespace.
    pub jail_root: PathBuf,
}

impl StatePaths {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            qmp_socket: state_dir.join("qmp.sock"),
            agent_socket: state_dir.join("agent.sock"),
            share_socket: state_dir.join("share.sock"),
            console_log: state_dir.join("console.log"),
            qemu_stderr: state_dir.join("qemu.stderr"),
            jail_root: state_dir.join("jail"),
        }
    }
}

/// The guest kernel command line.
///
/// `tsc_early_khz` matters: microvm has no device the kernel could calibrate
/// the TSC against, and without it early boot hangs. `panic=-1` plus QEMU's
/// `-no-reboot` turns a guest panic into a QEMU exit we can see.
pub fn kernel_cmdline(config: &VmConfig, tsc_khz: u64) -> String {
    // The agent knows the port name and vsock port (same constants).
    let channel = match config.agent_channel {
        AgentChannelKind::VirtioSerial => "virtio-serial",
        AgentChannelKind::Vsock { .. } => "vsock",
    };
    let mut params = vec![
        "console=ttyS0".to_owned(),
        // Only the one serial port exists; probing three more costs time.
        "8250.nr_uarts=1".to_owned(),
        format!("tsc_early_khz={tsc_khz}"),
        "panic=-1".to_owned(),
        "quiet".to_owned(),
        format!("{AGENT_CHANNEL_PARAM}={channel}"),
        // Expedited RCU grace periods: the agent's container operations wait for grace
        // periods (moving a process into a cgroup, mount namespace changes), which last
        // several scheduler ticks by default: writing cgroup.procs took 11-14 ms of each
        // container create under TCG, 1 ms expedited. The pod VM's few vCPUs are all the
        // expedited path interrupts, and only on those rare writes.
        "rcupdate.rcu_expedited=1".to_owned(),
    ];
    params.extend(config.extra_cmdline.iter().cloned());
    params.join(" ")
}

/// QEMU's arguments (without the binary).
pub fn qemu_args(config: &VmConfig, accel: Accel, tsc_khz: u64) -> Vec<OsString> {
    let mut args = ArgList::default();
    args.push("-name").push(format!(
        "spry-{},debug-threads=on",
        escape(config.id.as_str())
    ));
    // ACPI stays on: this kernel finds virtio-mmio devices only through ACPI
    // (it lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
    let mut machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on".to_owned();
    let backend = match &config.memory {
        GuestMemory::Anonymous => None,
        // A template's RAM must outlive QEMU: shared, so every guest write lands in the file.
        GuestMemory::SharedFile { path } => {
            Some(format!("mem-path={},share=on", escape_path(path)))
        }
        // A clone opens the template read-only and maps it private: guest writes copy the
        // page, and nothing can ever write back into the template (`rom=off` keeps the guest
        // side writable).
        GuestMemory::PrivateFile { path } => Some(format!(
            "mem-path={},share=off,readonly=on,rom=off",
            escape_path(path)
        )),
    };
    if let Some(backend) = backend {
        args.push("-object").push(format!(
            "memory-backend-file,id={RAM_BACKEND_ID},size={}M,{backend}",
            config.memory_mib
        ));
        machine.push_str(&format!(",memory-backend={RAM_BACKEND_ID}"));
    }
    args.push("-M").push(machine);
    // QEMU looks bare file names up in its firmware directory.
    args.push("-bios").push("qboot.rom");
    match accel {
        Accel::Kvm => args
            .push("-add-fd")
            .push(format!("fd={},set={}", fds::KVM, fds::KVM_SET))
            .push("-accel")
            .push(format!("kvm,device=/dev/fdset/{}", fds::KVM_SET))
            .push("-cpu")
            .push("host"),
        Accel::Tcg => {
            let accel = match config.tcg_cache_mib {
                0 => "tcg".to_owned(),
                mib => format!("tcg,tb-size={mib}"),
            };
            args.push("-accel").push(accel).push("-cpu").push("max")
        }
    };
    args.push("-smp").push(config.cpus.to_string());
    args.push("-m").push(format!("{}M", config.memory_mib));
    args.push("-nodefaults")
        .push("-no-user-config")
        .push("-nographic")
        .push("-no-reboot");
    // QEMU's own seccomp filter (what Kata recommends): no obsolete syscalls, no setuid or
    // capability games, no fork/exec, no scheduler or priority changes. A device-emulation
    // bug in a hostile guest's reach then cannot run programs on the host.
    args.push("-sandbox").push(SANDBOX);
    if config.restore.is_some() {
        // The restored RAM already holds the running kernel. Loading it again would only
        // cost a private heap copy of the image (rom blobs are not written into RAM while a
        // migration is incoming). Paused (-S) until the state is in and `cont` is sent.
        args.push("-incoming").push("defer").push("-S");
    } else {
        args.push("-kernel").push(&config.kernel);
        args.push("-initrd").push(&config.initramfs);
        args.push("-append").push(kernel_cmdline(config, tsc_khz));
    }

    args.push("-add-fd")
        .push(format!("fd={},set={}", fds::CONSOLE, fds::CONSOLE_SET));
    args.push("-chardev").push(format!(
        "file,id=console,path=/dev/fdset/{}",
        fds::CONSOLE_SET
    ));
    args.push("-serial").push("chardev:console");
    args.push("-chardev")
        .push(format!("socket,id=qmp,fd={},server=on,wait=off", fds::QMP));
    args.push("-mon").push("chardev=qmp,mode=control");

    args.push("-device").push("virtio-rng-device");
    args.push("-device")
        .push(format!("virtio-scsi-device,id={SCSI_CONTROLLER_ID}"));
    // Every VM has the file share's port (a template's clones need it on the template's
    // command line); it carries traffic only once a pod mounts the share.
    args.push("-device").push("virtio-serial-device,id=vser0");
    match config.agent_channel {
        AgentChannelKind::VirtioSerial => {
            args.push("-chardev").push(format!(
                "socket,id=agent,fd={},server=on,wait=off",
                fds::AGENT
            ));
            args.push("-device").push(format!(
                "virtserialport,chardev=agent,name={AGENT_PORT_NAME}"
            ));
        }
        AgentChannelKind::Vsock { cid } => {
            args.push("-device").push(format!(
                "vhost-vsock-device,guest-cid={cid},vhostfd={}",
                fds::VHOST_VSOCK
            ));
        }
    }
    args.push("-chardev").push(format!(
        "socket,id=share,fd={},server=on,wait=off",
        fds::SHARE
    ));
    args.push("-device").push(format!(
        "virtserialport,chardev=share,name={SHARE_PORT_NAME}"
    ));
    for (index, nic) in config.nics.iter().enumerate() {
        // No vhost: there is no /dev/vhost-net everywhere, and QEMU's own virtio-net
        // backend with the tap's vnet header keeps checksum and segmentation offloads.
        // The shim made the tap (QEMU may not) and hands over its fd.
        args.push("-netdev").push(format!(
            "tap,id=net{index},fd={},vhost=off",
            fds::TAP0 + index as std::os::fd::RawFd
        ));
        args.push("-device").push(format!(
            "virtio-net-device,netdev=net{index},mac={}",
            format_mac(&nic.mac)
        ));
    }
    args.0
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// QEMU option values separate keys with commas; a literal comma is doubled.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

#[derive(Default)]
struct ArgList(Vec<OsString>);

impl ArgList {
    fn push(&mut self, arg: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.0.push(arg.as_ref().to_owned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{AccelChoice, NetNamespace, Nic};

    fn config() -> VmConfig {
        VmConfig {
            id: "pod-1".into(),
            state_dir: "/run/spry/pod-1".into(),
            kernel: "/g/vmlinux".into(),
            initramfs: "/g/initramfs.img".into(),
            cpus: 2,
            memory_mib: 512,
            accel: AccelChoice::Auto,
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            agent_channel: AgentChannelKind::VirtioSerial,
            extra_cmdline: vec!["loglevel=7".into()],
            netns: NetNamespace::Inherit,
            nics: Vec::new(),
            tcg_cache_mib: 0,
            memory: GuestMemory::Anonymous,
            restore: None,
            jail: Default::default(),
            cgroup: Vec::new(),
        }
    }

    fn args_of(config: &VmConfig, accel: Accel) -> Vec<String> {
        qemu_args(config, accel, 2_445_404)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_after(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn kernel_cmdline_has_console_tsc_panic_channel_then_extras() {
        let line = kernel_cmdline(&config(), 2_445_404);
        assert_eq!(
            line,
            "console=ttyS0 8250.nr_uarts=1 tsc_early_khz=2445404 panic=-1 quiet \
             spry.agent_channel=virtio-serial rcupdate.rcu_expedited=1 loglevel=7"
        );
        let vsock = VmConfig {
            agent_channel: AgentChannelKind::Vsock { cid: 7 },
            ..config()
        };
        assert!(kernel_cmdline(&vsock, 1).contains("spry.agent_channel=vsock "));
    }

    #[test]
    fn tcg_and_kvm_pick_accel_and_cpu() {
        let tcg = args_of(&config(), Accel::Tcg);
        assert_eq!(value_after(&tcg, "-accel"), ["tcg"]);
        assert_eq!(value_after(&tcg, "-cpu"), ["max"]);
        let small_cache = VmConfig {
            tcg_cache_mib: 24,
            ..config()
        };
        assert_eq!(
            value_after(&args_of(&small_cache, Accel::Tcg), "-accel"),
            ["tcg,tb-size=24"]
        );
        // QEMU opens /dev/kvm through the fd handed to it.
        let kvm = args_of(&config(), Accel::Kvm);
        assert_eq!(value_after(&kvm, "-accel"), ["kvm,device=/dev/fdset/2"]);
        assert!(value_after(&kvm, "-add-fd").contains(&"fd=7,set=2".to_owned()));
        assert_eq!(value_after(&kvm, "-cpu"), ["host"]);
    }

    #[test]
    fn machine_devices_and_sockets() {
        let args = args_of(&config(), Accel::Tcg);
        assert_eq!(
            value_after(&args, "-M"),
            ["microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=on"]
        );
        assert_eq!(value_after(&args, "-bios"), ["qboot.rom"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        assert_eq!(value_after(&args, "-m"), ["512M"]);
        assert_eq!(value_after(&args, "-kernel"), ["/g/vmlinux"]);
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag}");
        }
        assert_eq!(
            value_after(&args, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(
            value_after(&args, "-device"),
            [
                "virtio-rng-device",
                "virtio-scsi-device,id=scsi0",
                "virtio-serial-device,id=vser0",
                "virtserialport,chardev=agent,name=spry.agent",
                "virtserialport,chardev=share,name=spry.fs"
            ]
        );
        // Every socket and the console are fds the shim made; no host path of the state
        // dir reaches QEMU.
        assert_eq!(
            value_after(&args, "-chardev"),
            [
                "file,id=console,path=/dev/fdset/1",
                "socket,id=qmp,fd=3,server=on,wait=off",
                "socket,id=agent,fd=4,server=on,wait=off",
                "socket,id=share,fd=5,server=on,wait=off",
            ]
        );
        assert_eq!(value_after(&args, "-add-fd"), ["fd=6,set=1"]);
        assert!(!args.iter().any(|a| a.contains("/run/spry")), "{args:?}");
    }

    #[test]
    fn templates_share_their_ram_file_and_clones_map_it_private_without_a_kernel() {
        let template = VmConfig {
            memory: GuestMemory::SharedFile {
                path: "/t/memory".into(),
            },
            ..config()
        };
        let args = args_of(&template, Accel::Tcg);
        assert_eq!(
            value_after(&args, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/t/memory,share=on"]
        );
        assert!(value_after(&args, "-M")[0].ends_with(",acpi=on,memory-backend=ram0"));
        assert_eq!(value_after(&args, "-kernel"), ["/g/vmlinux"]);

        let clone = VmConfig {
            memory: GuestMemory::PrivateFile {
                path: "/t/memory".into(),
            },
            restore: Some("/t/state".into()),
            ..config()
        };
        let args = args_of(&clone, Accel::Tcg);
        assert_eq!(
            value_after(&args, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/t/memory,share=off,readonly=on,rom=off"]
        );
        assert_eq!(value_after(&args, "-incoming"), ["defer"]);
        assert!(args.iter().any(|a| a == "-S"));
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(value_after(&args, flag).is_empty(), "{flag}");
        }
    }

    #[test]
    fn vsock_replaces_the_serial_port() {
        let vsock = VmConfig {
            agent_channel: AgentChannelKind::Vsock { cid: 42 },
            ..config()
        };
        let args = args_of(&vsock, Accel::Kvm);
        let devices = value_after(&args, "-device");
        assert!(devices.contains(&"vhost-vsock-device,guest-cid=42,vhostfd=8".to_owned()));
        assert!(!devices.iter().any(|d| d.contains("name=spry.agent")));
        assert!(devices.contains(&"virtserialport,chardev=share,name=spry.fs".to_owned()));
    }

    #[test]
    fn each_nic_is_a_tap_backed_virtio_net_device_with_its_mac() {
        let with_nics = VmConfig {
            netns: NetNamespace::New,
            nics: vec![
                Nic {
                    tap: "spry-tap0".into(),
                    mac: [0x02, 0x53, 0x50, 0x52, 0x59, 0],
                },
                Nic {
                    tap: "spry-tap1".into(),
                    mac: [0x02, 0x53, 0x50, 0x52, 0x59, 1],
                },
            ],
            ..config()
        };
        let args = args_of(&with_nics, Accel::Tcg);
        assert_eq!(
            value_after(&args, "-netdev"),
            ["tap,id=net0,fd=10,vhost=off", "tap,id=net1,fd=11,vhost=off"]
        );
        let devices = value_after(&args, "-device");
        assert_eq!(
            &devices[devices.len() - 2..],
            [
                "virtio-net-device,netdev=net0,mac=02:53:50:52:59:00",
                "virtio-net-device,netdev=net1,mac=02:53:50:52:59:01"
            ]
        );
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let odd = VmConfig {
            memory: GuestMemory::SharedFile {
                path: "/t/a,b".into(),
            },
            ..config()
        };
        let args = args_of(&odd, Accel::Tcg);
        assert!(value_after(&args, "-object")[0].contains("mem-path=/t/a,,b,share=on"));
    }
}
