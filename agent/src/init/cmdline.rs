//! The agent's kernel command line parameters.

/// `spry.*` settings from /proc/cmdline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelParams {
    /// `spry.agent_channel=virtio-serial|vsock` (default virtio-serial).
    pub channel: String,
    /// `spry.log=<level or filter>` (default info).
    pub log: String,
}

impl Default for KernelParams {
    fn default() -> Self {
        Self {
            channel: "virtio-serial".into(),
            log: "info".into(),
        }
    }
}

/// Parses the command line; unknown parameters are the kernel's business.
pub fn parse(cmdline: &str) -> KernelParams {
    let mut params = KernelParams::default();
    for word in cmdline.split_whitespace() {
        if let Some(value) = word.strip_prefix("spry.agent_channel=") {
            params.channel = value.to_string();
        } else if let Some(value) = word.strip_prefix("spry.log=") {
            params.log = value.to_string();
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_spry_parameters_and_defaults_the_rest() {
        let params = parse("console=ttyS0 quiet spry.agent_channel=vsock spry.log=debug panic=1\n");
        assert_eq!(params.channel, "vsock");
        assert_eq!(params.log, "debug");
        assert_eq!(parse("console=ttyS0"), KernelParams::default());
    }
}
