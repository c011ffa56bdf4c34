//! Spry's configuration file (`/etc/spry/config.toml`), validated when loaded.
//!
//! Every key is optional; unknown keys are errors so that a typo fails at start instead of
//! being silently ignored. The README documents each key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::template::TemplatePolicy;
use crate::vm::{AccelChoice, AgentChannelKind, VmConfig};

/// Where the config is read from when no path is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/spry/config.toml";
/// Translated-code cache of a TCG VM; see `VmSettings::tcg_cache_mib` and the README.
/// Bounded (QEMU's own default is up to 1 GiB, which a pod's memory limit would have to
/// cover): a pod fills ~45-72 MiB of it starting and idling, and 24 MiB was measured to
/// slow starts by flushing, so 256 leaves room for a busy guest.
pub const DEFAULT_TCG_CACHE_MIB: u32 = 256;
/// What QEMU uses for the cache when `tcg_cache_mib` is 0.
pub const QEMU_DEFAULT_TCG_CACHE_MIB: u32 = 1024;
/// Unused layer images kept in the state dir (usually tmpfs, so memory): room for a
/// Debian-based language runtime's image (python's test image packs to 256 MB) and a few
/// small ones, so a restart or a rollback does not pack again.
pub const DEFAULT_KEEP_UNUSED_LAYER_IMAGES_MIB: u32 = 512;
/// Where `spry install` puts the guest kernel and initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/usr/local/share/spry/guest";

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: {key} = {value} is out of range ({allowed})")]
    OutOfRange {
        path: PathBuf,
        key: &'static str,
        value: u64,
        allowed: &'static str,
    },
    #[error("containerd's runtime options ({type_url}) cannot be decoded")]
    RuntimeOptions {
        type_url: String,
        #[source]
        source: protobuf::Error,
    },
    #[error("config file {path}: {key} = {value:?} is not a tracing filter (e.g. \"info\" or \"spry_shim=debug,info\")")]
    LogFilter {
        path: PathBuf,
        key: &'static str,
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("config file {path}: vm.guest_log_level = {value:?} cannot be one kernel command-line word (no spaces or quotes)")]
    GuestLogWord { path: PathBuf, value: String },
    #[error("config file {path}: [pool] size = {size} needs template = \"auto\" (pooled VMs are restored from the template); set size = 0 or turn templates on")]
    PoolWithoutTemplate { path: PathBuf, size: u32 },
    #[error("config file {path}: {key} must be an absolute path, got {value}")]
    RelativePath {
        path: PathBuf,
        key: &'static str,
        value: PathBuf,
    },
}

/// The whole config file. Serialized only to hand a handler's config to its pool's spare
/// shims (`crate::pool`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The shim's `tracing` filter, e.g. "info" or "spry_shim=debug,info" (`SPRY_LOG`
    /// in the shim's environment overrides it).
    pub log_level: String,
    /// Runtime state (per-VM dirs, sockets, probe cache). Must be on a local filesystem.
    pub state_dir: PathBuf,
    /// Start pods from VM templates ("auto") or always boot cold ("off").
    pub template: TemplatePolicy,
    pub vm: VmSettings,
    pub pool: PoolSettings,
    pub rootfs: RootfsSettings,
}

/// Containers' root filesystems on the host (`crate::rootfs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RootfsSettings {
    /// The erofs images of image layers no container uses any more, MiB of the state dir
    /// kept so a container of the same image (a restart, a recreated pod, a rollback)
    /// finds its image packed; the least recently used go first, and images whose
    /// layers containerd removed go at once. 0: deleted with their last container.
    pub keep_unused_mib: u32,
}

impl Default for RootfsSettings {
    fn default() -> Self {
        Self {
            keep_unused_mib: DEFAULT_KEEP_UNUSED_LAYER_IMAGES_MIB,
        }
    }
}

impl RootfsSettings {
    /// The bound in bytes.
    pub fn keep_unused_bytes(&self) -> u64 {
        u64::from(self.keep_unused_mib) << 20
    }
}

/// The warm pool: VMs restored from the template ahead of pods (`crate::pool`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// How many restored VMs this handler keeps ready for its next pods (0: none). Needs
    /// `template = "auto"`.
    pub size: u32,
}

/// How pod VMs are built.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VmSettings {
    /// Uncompressed guest kernel (ELF vmlinux with a PVH note).
    pub kernel: PathBuf,
    /// Guest initramfs holding the agent as /init.
    pub initramfs: PathBuf,
    /// QEMU binary.
    pub qemu: PathBuf,
    pub accelerator: AccelChoice,
    /// Default vCPUs of a pod VM.
    pub cpus: u32,
    /// Default memory of a pod VM, MiB.
    pub memory_mib: u32,
    /// Under TCG only: the translated-code cache per VM, MiB (0: QEMU's default, up to
    /// 1 GiB). The biggest private cost of an idle software-emulated VM; counted in the
    /// RuntimeClass overhead unless the accelerator is `kvm`.
    pub tcg_cache_mib: u32,
    /// QEMU runs jailed as one of the uids `jail_uid_base .. jail_uid_base + jail_uids`
    /// (one per running VM) with group `jail_uid_base`. Pick ids no user or container
    /// on the node has.
    pub jail_uid_base: u32,
    /// How many VMs may run at once.
    pub jail_uids: u32,
    /// How long a booting VM's agent may take to answer before the pod's start (or a
    /// template's build) fails, seconds. Under TCG a cold boot takes a few seconds.
    pub boot_timeout_s: u32,
    /// The guest agent's `tracing` filter, e.g. "info,libcontainer=debug" to see each
    /// step of a container's create and start in the VM's console log (the agent's
    /// default is "info"). It goes on the kernel command line, so VM templates and
    /// pooled VMs made with another filter are not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_log_level: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            state_dir: PathBuf::from("/run/spry"),
            template: TemplatePolicy::Auto,
            vm: VmSettings::default(),
            pool: PoolSettings::default(),
            rootfs: RootfsSettings::default(),
        }
    }
}

impl Default for VmSettings {
    fn default() -> Self {
        let guest = Path::new(DEFAULT_GUEST_DIR);
        Self {
            kernel: guest.join("vmlinux"),
            initramfs: guest.join("initramfs.img"),
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accelerator: AccelChoice::Auto,
            cpus: crate::vm::DEFAULT_CPUS,
            memory_mib: crate::vm::DEFAULT_MEMORY_MIB,
            tcg_cache_mib: DEFAULT_TCG_CACHE_MIB,
            jail_uid_base: crate::vm::DEFAULT_UID_BASE,
            jail_uids: crate::vm::DEFAULT_UID_COUNT,
            boot_timeout_s: crate::sandbox::DEFAULT_BOOT_TIMEOUT.as_secs() as u32,
            guest_log_level: None,
        }
    }
}

impl Config {
    /// Loads `path`, or the defaults when `path` is the default location and absent.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::parse(&text, path)
    }

    /// The VM this config describes, named `id`, with `vm_dir` as its own state dir (the
    /// composition root names it, see `host.rs`).
    pub fn vm_config(&self, id: &str, vm_dir: PathBuf) -> VmConfig {
        VmConfig {
            id: id.to_owned(),
            state_dir: vm_dir,
            kernel: self.vm.kernel.clone(),
            initramfs: self.vm.initramfs.clone(),
            cpus: self.vm.cpus,
            memory_mib: self.vm.memory_mib,
            accel: self.vm.accelerator,
            qemu: self.vm.qemu.clone(),
            agent_channel: AgentChannelKind::VirtioSerial,
            tcg_cache_mib: self.vm.tcg_cache_mib,
            extra_cmdline: self
                .vm
                .guest_log_level
                .iter()
                .map(|filter| format!("{}={filter}", crate::vm::GUEST_LOG_PARAM))
                .collect(),
            jail: crate::vm::JailIds {
                uid_base: self.vm.jail_uid_base,
                count: self.vm.jail_uids,
            },
            ..Default::default()
        }
    }

    /// Loads `path`, which must exist (a handler's `ConfigPath`).
    pub fn load_required(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let range = |key, value: u32, lo: u32, hi: u32, allowed| {
            if value < lo || value > hi {
                return Err(ConfigError::OutOfRange {
                    path: path.to_path_buf(),
                    key,
                    value: value.into(),
                    allowed,
                });
            }
            Ok(())
        };
        let guest_log = self.vm.guest_log_level.as_ref();
        for (key, value) in [
            ("log_level", Some(&self.log_level)),
            ("vm.guest_log_level", guest_log),
        ] {
            let Some(value) = value else { continue };
            if let Err(source) = tracing_subscriber::EnvFilter::try_new(value) {
                return Err(ConfigError::LogFilter {
                    path: path.to_path_buf(),
                    key,
                    value: value.clone(),
                    source,
                });
            }
        }
        // The kernel splits its command line at spaces and honours quotes.
        if let Some(value) = guest_log
            .filter(|v| v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '"'))
        {
            return Err(ConfigError::GuestLogWord {
                path: path.to_path_buf(),
                value: value.clone(),
            });
        }
        range("vm.cpus", self.vm.cpus, 1, 64, "1..=64")?;
        range("vm.memory_mib", self.vm.memory_mib, 64, 65536, "64..=65536")?;
        if self.vm.tcg_cache_mib != 0 {
            range(
                "vm.tcg_cache_mib",
                self.vm.tcg_cache_mib,
                8,
                4096,
                "0 or 8..=4096",
            )?;
        }
        // Ids below 65536 belong to the system and its users; the range must fit in u32
        // below the overflow id (u32::MAX is "no id").
        range(
            "vm.jail_uid_base",
            self.vm.jail_uid_base,
            65536,
            u32::MAX - 1 - self.vm.jail_uids.min(u32::MAX - 65537),
            "65536.. with jail_uid_base + jail_uids below 4294967295",
        )?;
        range("vm.jail_uids", self.vm.jail_uids, 1, 1 << 20, "1..=1048576")?;
        range(
            "vm.boot_timeout_s",
            self.vm.boot_timeout_s,
            1,
            3600,
            "1..=3600",
        )?;
        range("pool.size", self.pool.size, 0, 16, "0..=16")?;
        range(
            "rootfs.keep_unused_mib",
            self.rootfs.keep_unused_mib,
            0,
            1 << 20,
            "0..=1048576",
        )?;
        if self.pool.size > 0 && self.template == TemplatePolicy::Off {
            return Err(ConfigError::PoolWithoutTemplate {
                path: path.to_path_buf(),
                size: self.pool.size,
            });
        }
        for (key, value) in [
            ("state_dir", &self.state_dir),
            ("vm.kernel", &self.vm.kernel),
            ("vm.initramfs", &self.vm.initramfs),
            ("vm.qemu", &self.vm.qemu),
        ] {
            if !value.is_absolute() {
                return Err(ConfigError::RelativePath {
                    path: path.to_path_buf(),
                    key,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/spry/config.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
            log_level = "debug"
            state_dir = "/var/run/spry"
            template = "off"
            [vm]
            kernel = "/opt/k"
            initramfs = "/opt/i"
            qemu = "/usr/local/bin/qemu-system-x86_64"
            accelerator = "tcg"
            cpus = 2
            memory_mib = 512
            "#,
        )
        .unwrap();
        assert_eq!(c.vm.accelerator, AccelChoice::Tcg);
        assert_eq!(c.template, TemplatePolicy::Off);
        assert_eq!(c.vm.cpus, 2);
        assert_eq!(c.state_dir, PathBuf::from("/var/run/spry"));
    }

    #[test]
    fn unknown_key_is_an_error_that_names_it() {
        let err = parse("[vm]\nmemory_mb = 512\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("memory_mb"), "{chain}");
    }

    #[test]
    fn bad_accelerator_or_template_policy_is_rejected() {
        assert!(parse("[vm]\naccelerator = \"hvf\"\n").is_err());
        assert!(parse("template = \"always\"\n").is_err());
        assert_eq!(parse("").unwrap().template, TemplatePolicy::Auto);
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let err = parse("[vm]\nmemory_mib = 16\n").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::OutOfRange {
                key: "vm.memory_mib",
                ..
            }
        ));
        assert!(parse("[vm]\ncpus = 0\n").is_err());
        assert!(matches!(
            parse("[pool]\nsize = 17\n").unwrap_err(),
            ConfigError::OutOfRange {
                key: "pool.size",
                ..
            }
        ));
        assert_eq!(parse("[pool]\nsize = 2\n").unwrap().pool.size, 2);
        let err = parse("template = \"off\"\n[pool]\nsize = 1\n").unwrap_err();
        assert!(
            matches!(err, ConfigError::PoolWithoutTemplate { size: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("template = \"auto\""), "{err}");
        assert!(matches!(
            parse("[rootfs]\nkeep_unused_mib = 1048577\n").unwrap_err(),
            ConfigError::OutOfRange {
                key: "rootfs.keep_unused_mib",
                ..
            }
        ));
        let none = parse("[rootfs]\nkeep_unused_mib = 0\n").unwrap();
        assert_eq!(none.rootfs.keep_unused_bytes(), 0);
        assert_eq!(parse("").unwrap().rootfs.keep_unused_bytes(), 512 << 20);
        assert!(parse("[rootfs]\nkeep_mib = 1\n").is_err(), "unknown key");
    }

    #[test]
    fn a_config_survives_its_trip_to_a_spare_shim() {
        let config = parse("state_dir = \"/run/x\"\n[vm]\ncpus = 2\n[pool]\nsize = 1\n[rootfs]\nkeep_unused_mib = 64\n").unwrap();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(parse(&text).unwrap(), config);
    }

    #[test]
    fn a_log_level_that_is_no_filter_is_rejected() {
        let err = parse("log_level = \"spry_shim=loud\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::LogFilter { .. }), "{err:?}");
        assert_eq!(
            parse("log_level = \"spry_shim=debug,info\"\n")
                .unwrap()
                .log_level,
            "spry_shim=debug,info"
        );
    }

    #[test]
    fn the_guest_log_level_goes_on_the_kernel_command_line_as_one_word() {
        let config = parse("[vm]\nguest_log_level = \"info,libcontainer=debug\"\n").unwrap();
        let vm = config.vm_config("pod", PathBuf::from("/run/spry/vms/pod"));
        assert_eq!(vm.extra_cmdline, ["spry.log=info,libcontainer=debug"]);
        let line = crate::vm::cmdline::kernel_cmdline(&vm, 1);
        assert!(
            line.ends_with(" spry.log=info,libcontainer=debug"),
            "{line}"
        );
        assert!(parse("")
            .unwrap()
            .vm_config("pod", PathBuf::new())
            .extra_cmdline
            .is_empty());
        let text = toml::to_string(&config).unwrap();
        assert_eq!(
            parse(&text).unwrap(),
            config,
            "survives the trip to a spare shim"
        );
        for word in ["info debug", "info,x=\\\"y\\\"", ""] {
            let err = parse(&format!("[vm]\nguest_log_level = \"{word}\"\n")).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::GuestLogWord { .. } | ConfigError::LogFilter { .. }
                ),
                "{word:?}: {err:?}"
            );
        }
        let err = parse("[vm]\nguest_log_level = \"libcontainer=loud\"\n").unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::LogFilter {
                    key: "vm.guest_log_level",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("vm.guest_log_level"), "{err}");
    }

    #[test]
    fn relative_paths_are_rejected() {
        let err = parse("[vm]\nkernel = \"vmlinux\"\n").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::RelativePath {
                key: "vm.kernel",
                ..
            }
        ));
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Path::new("/nonexistent/spry.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }
}
