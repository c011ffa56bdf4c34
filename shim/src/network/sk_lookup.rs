//! Steering every TCP connection to the pod netns's loopback to one listening socket, with
//! a BPF socket-lookup (SK_LOOKUP) program attached to that namespace.
//!
//! containerd serves CRI port-forward by dialling `localhost:PORT` inside the pod's network
//! namespace; in a Spry pod nothing listens there (the workload runs in the VM). With this
//! program, a connection to 127.0.0.1:PORT or [::1]:PORT, for any PORT, lands on the shim's
//! listener instead, whose accepted socket still says which PORT was asked for. The
//! program is a few dozen instructions written out below (no compiler, no object file); it
//! is attached through a BPF link that the shim holds, so it goes away with the shim.

use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};

use crate::sys::bpf;

/// SOCKMAP slots: the IPv4 listener and the IPv6 one.
const SLOT_V4: i32 = 0;
const SLOT_V6: i32 = 1;

/// The program, attached: dropping it detaches it.
pub struct LoopbackSteering {
    _map: OwnedFd,
    _program: OwnedFd,
    _link: OwnedFd,
}

impl LoopbackSteering {
    /// Steers loopback TCP connections in `netns` (an open netns file) to `v4` and, when
    /// given, `v6`: listeners created in that namespace.
    pub fn attach(
        netns: &std::fs::File,
        v4: &TcpListener,
        v6: Option<&TcpListener>,
    ) -> std::io::Result<Self> {
        let map = bpf::create_sockmap(2)?;
        bpf::sockmap_insert(map.as_fd(), SLOT_V4 as u32, v4.as_fd())?;
        if let Some(v6) = v6 {
            bpf::sockmap_insert(map.as_fd(), SLOT_V6 as u32, v6.as_fd())?;
        }
        let code = program(std::os::fd::AsRawFd::as_raw_fd(&map));
        let program = bpf::load_sk_lookup(&code)?;
        let link = bpf::link_sk_lookup(program.as_fd(), netns.as_fd())?;
        Ok(Self {
            _map: map,
            _program: program,
            _link: link,
        })
    }
}

// Offsets in `struct bpf_sk_lookup` (<linux/bpf.h>).
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_IP6: i16 = 44;
// Helpers.
const MAP_LOOKUP_ELEM: i32 = 1;
const SK_RELEASE: i32 = 86;
const SK_ASSIGN: i32 = 124;
const SK_PASS: i32 = 1;
const IPPROTO_TCP: i32 = 6;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
/// 127.0.0.1 and the last word of ::1, as a 32-bit load of network-order bytes reads them.
const LOOPBACK4: i32 = i32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK6_LAST: i32 = i32::from_ne_bytes([0, 0, 0, 1]);

/// The program, with `map_fd` as its SOCKMAP:
///
/// ```text
/// if protocol != TCP: pass
/// if family == AF_INET:  if local_ip4 != 127.0.0.1: pass; key = 0
/// elif family == AF_INET6: if local_ip6 != ::1: pass; key = 1
/// else: pass
/// sk = sockmap[key]; if !sk: pass
/// bpf_sk_assign(ctx, sk, 0); bpf_sk_release(sk); pass
/// ```
pub(super) fn program(map_fd: i32) -> Vec<u8> {
    let mut a = Asm::default();
    a.mov_reg(6, 1);
    a.load_ctx(2, CTX_PROTOCOL);
    a.jne(2, IPPROTO_TCP, "pass");
    a.load_ctx(2, CTX_FAMILY);
    a.jne(2, AF_INET, "v6");
    a.load_ctx(3, CTX_LOCAL_IP4);
    a.jne(3, LOOPBACK4, "pass");
    a.store_key(SLOT_V4);
    a.ja("lookup");
    a.label("v6");
    a.jne(2, AF_INET6, "pass");
    for word in 0..4 {
        a.load_ctx(3, CTX_LOCAL_IP6 + 4 * word);
        let expected = if word == 3 { LOOPBACK6_LAST } else { 0 };
        a.jne(3, expected, "pass");
    }
    a.store_key(SLOT_V6);
    a.label("lookup");
    a.mov_reg(2, 10);
    a.add_imm(2, -4);
    a.load_map_fd(1, map_fd);
    a.call(MAP_LOOKUP_ELEM);
    a.jeq(0, 0, "pass");
    a.mov_reg(7, 0);
    a.mov_reg(1, 6);
    a.mov_reg(2, 7);
    a.mov_imm(3, 0);
    a.call(SK_ASSIGN);
    a.mov_reg(1, 7);
    a.call(SK_RELEASE);
    a.label("pass");
    a.mov_imm(0, SK_PASS);
    a.exit();
    a.finish()
}

/// A minimal eBPF assembler: instructions plus jumps to named labels, resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<[u8; 8]>,
    labels: Vec<(&'static str, usize)>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn insn(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        let mut insn = [0u8; 8];
        insn[0] = code;
        insn[1] = (src << 4) | dst;
        insn[2..4].copy_from_slice(&off.to_le_bytes());
        insn[4..8].copy_from_slice(&imm.to_le_bytes());
        self.insns.push(insn);
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }

    fn jump(&mut self, code: u8, dst: u8, imm: i32, target: &'static str) {
        self.jumps.push((self.insns.len(), target));
        self.insn(code, dst, 0, 0, imm);
    }

    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.insn(0xbf, dst, src, 0, 0);
    }

    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.insn(0xb7, dst, 0, 0, imm);
    }

    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.insn(0x07, dst, 0, 0, imm);
    }

    /// `dst = *(u32 *)(r6 + off)`: r6 holds the context.
    fn load_ctx(&mut self, dst: u8, off: i16) {
        self.insn(0x61, dst, 6, off, 0);
    }

    /// `*(u32 *)(r10 - 4) = key`.
    fn store_key(&mut self, key: i32) {
        self.insn(0x62, 10, 0, -4, key);
    }

    /// `dst = map` (a 16-byte load of a map fd the kernel turns into the map's address).
    fn load_map_fd(&mut self, dst: u8, fd: i32) {
        const BPF_PSEUDO_MAP_FD: u8 = 1;
        self.insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd);
        self.insn(0, 0, 0, 0, 0);
    }

    fn jne(&mut self, dst: u8, imm: i32, target: &'static str) {
        self.jump(0x55, dst, imm, target);
    }

    fn jeq(&mut self, dst: u8, imm: i32, target: &'static str) {
        self.jump(0x15, dst, imm, target);
    }

    fn ja(&mut self, target: &'static str) {
        self.jump(0x05, 0, 0, target);
    }

    fn call(&mut self, helper: i32) {
        self.insn(0x85, 0, 0, 0, helper);
    }

    fn exit(&mut self) {
        self.insn(0x95, 0, 0, 0, 0);
    }

    /// The program's bytes, every jump pointed at its label. A jump to a label that does not
    /// exist is a bug in [`program`], caught by its unit test.
    fn finish(mut self) -> Vec<u8> {
        for (at, target) in &self.jumps {
            let to = self
                .labels
                .iter()
                .find(|(name, _)| name == target)
                .map(|(_, index)| *index)
                .unwrap_or(*at + 1);
            let off = (to as i64 - *at as i64 - 1) as i16;
            self.insns[*at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        self.insns.concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insns(code: &[u8]) -> Vec<(u8, u8, i16, i32)> {
        code.chunks(8)
            .map(|i| {
                (
                    i[0],
                    i[1],
                    i16::from_le_bytes([i[2], i[3]]),
                    i32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                )
            })
            .collect()
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_it_ends_in_pass() {
        let code = program(42);
        let all = insns(&code);
        let last = all.len() as i64 - 1;
        for (index, (op, _, off, _)) in all.iter().enumerate() {
            if [0x55, 0x15, 0x05].contains(op) {
                let to = index as i64 + 1 + i64::from(*off);
                assert!((0..=last).contains(&to), "jump at {index} to {to}");
                assert!(
                    *off > 0,
                    "jumps only go forward (no loops for the verifier)"
                );
            }
        }
        assert_eq!(all[all.len() - 2], (0xb7, 0, 0, SK_PASS), "r0 = SK_PASS");
        assert_eq!(all[all.len() - 1].0, 0x95, "exit");
        let map_load = all.iter().position(|i| i.0 == 0x18).unwrap();
        assert_eq!(
            all[map_load],
            (0x18, 0x11, 0, 42),
            "r1 = map fd 42 (pseudo)"
        );
    }

    #[test]
    fn loopback_constants_are_the_network_order_words() {
        assert_eq!(LOOPBACK4.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(LOOPBACK6_LAST.to_ne_bytes(), [0, 0, 0, 1]);
    }
}
