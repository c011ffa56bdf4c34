//! A 1 GiB-declared image served by a real layer daemon (`spry-snapshotter mount-layer`):
//! one file of 32 chunks of 32 MiB (the largest a TOC may declare), each a gzip bomb of
//! zeros a few KiB on the wire, read whole through the FUSE mount while the background
//! fetch runs. The daemon's peak memory must stay under the bound the README documents.
//! Needs root and /dev/fuse, and fails (never skips) without them.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, StatusCode};
use spry_snapshotter::convert::{convert_tar, LayerConvertOptions};

/// The README's bound for one layer daemon ("Memory per layer").
const BOUND_MIB: u64 = 512;
const FILE_BYTES: u64 = 1 << 30;
const CHUNK: u64 = 32 << 20;

fn bomb_layer() -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(FILE_BYTES);
    tar.append_data(&mut h, "bomb", std::io::repeat(0).take(FILE_BYTES))
        .unwrap();
    let opts = LayerConvertOptions {
        chunk_size: CHUNK,
        prioritized: Vec::new(),
        hot: Default::default(),
    };
    let (out, blob) = convert_tar(&tar.into_inner().unwrap()[..], Vec::new(), &opts).unwrap();
    (blob, out.toc_digest)
}

use std::io::Read as _;

/// Serves `blob` as any digest of any repository: HEAD with its size, GET with ranges.
fn serve(runtime: &tokio::runtime::Runtime, blob: Arc<Vec<u8>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let _guard = runtime.enter();
    let make = make_service_fn(move |_| {
        let blob = blob.clone();
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req: Request<Body>| {
                let blob = blob.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &blob)) }
            }))
        }
    });
    runtime.spawn(hyper::Server::from_tcp(listener).unwrap().serve(make));
    addr
}

fn answer(req: &Request<Body>, blob: &[u8]) -> Response<Body> {
    if !req.uri().path().contains("/blobs/") {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .unwrap();
    }
    if req.method() == Method::HEAD {
        return Response::builder()
            .header("content-length", blob.len())
            .body(Body::empty())
            .unwrap();
    }
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    let Some((from, to)) = range else {
        return Response::new(Body::from(blob.to_vec()));
    };
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .body(Body::from(blob[from..=to.min(blob.len() - 1)].to_vec()))
        .unwrap()
}

fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn a_layer_daemon_stays_bounded_serving_a_1_gib_bomb() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (FUSE mounts)");
    assert!(Path::new("/dev/fuse").exists(), "needs /dev/fuse");
    let (blob, toc_digest) = bomb_layer();
    assert!(
        blob.len() < 4 << 20,
        "the bomb is {} bytes on the wire",
        blob.len()
    );
    let digest = spry_snapshotter::estargz::sha256_digest(&blob);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addr = serve(&runtime, Arc::new(blob));

    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().join("fs");
    std::fs::create_dir(&mountpoint).unwrap();
    let job = serde_json::json!({
        "source": {
            "image_ref": format!("{addr}/bomb/image:1"),
            "layer_digest": digest,
            "toc_digest": toc_digest,
        },
        "mountpoint": mountpoint,
        "cache_dir": dir.path().join("cache"),
        "registry": {},
        "lazy": {"prefetch": false, "background_fetch": true},
    });
    let job_path = dir.path().join("layer.json");
    std::fs::File::create(&job_path)
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_spry-snapshotter"))
        .arg("mount-layer")
        .arg(&job_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(daemon.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let read = (ready.trim() == "ready").then(|| {
        let mut file = std::fs::File::open(mountpoint.join("bomb")).unwrap();
        std::io::copy(&mut file, &mut std::io::sink())
    });
    let peak = peak_rss_mib(daemon.id());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = daemon.wait();
    let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
    assert_eq!(ready.trim(), "ready", "the layer daemon did not mount");
    assert_eq!(read.unwrap().unwrap(), FILE_BYTES);
    eprintln!("layer daemon peak RSS serving a 1 GiB-declared bomb: {peak} MiB");
    assert!(
        peak < BOUND_MIB,
        "peak RSS {peak} MiB over the {BOUND_MIB} MiB bound"
    );
}
