//! Generates Rust code from `agent.proto` and containerd's `runtimeoptions.proto`, and with
//! the `cri` feature from the CRI's `cri/api.proto` and the part of containerd's snapshots API
//! in `containerd/snapshots.proto` (pure Rust, no protoc needed).
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    Codegen::new()
        .out_dir(&out)
        .inputs(["agent.proto", "runtimeoptions.proto"])
        .include(".")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generate agent protocol code");
    // The generated files carry inner attributes (`#![...]`, `//!`), which
    // `include!` rejects; lib.rs sets the same allowances on the wrapping modules.
    for name in ["agent.rs", "agent_ttrpc.rs", "runtimeoptions.rs"] {
        strip_inner_attributes(&out, name);
    }
    if std::env::var_os("CARGO_FEATURE_CRI").is_some() {
        // Plain protobuf messages (gRPC framing is the client's: a tonic codec).
        plain_messages(&out, "cri", "api");
        plain_messages(&out, "containerd", "snapshots");
    }
    println!("cargo:rerun-if-changed=agent.proto");
    println!("cargo:rerun-if-changed=runtimeoptions.proto");
}

/// Generates `<dir>/<name>.proto`'s messages (no service code) into `out/<name>.rs`.
fn plain_messages(out: &str, dir: &str, name: &str) {
    let proto = format!("{dir}/{name}.proto");
    Codegen::new()
        .out_dir(out)
        .inputs([proto.as_str()])
        .include(dir)
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .unwrap_or_else(|e| panic!("generate code from {proto}: {e}"));
    strip_inner_attributes(out, &format!("{name}.rs"));
    println!("cargo:rerun-if-changed={proto}");
}

fn strip_inner_attributes(out: &str, name: &str) {
    let path = std::path::Path::new(out).join(name);
    let text = std::fs::read_to_string(&path).expect("read generated code");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
        .collect();
    std::fs::write(&path, kept.join("\n")).expect("write generated code");
}
