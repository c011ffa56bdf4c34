//! The one-node cluster's certificates, made with the openssl CLI: a CA, the apiserver's
//! serving certificate, an admin client certificate (group `system:masters`) every component
//! and kubectl use, the kubelet's serving certificate, and the service-account key pair.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::system::run_checked;

/// The service network's first address: the `kubernetes` Service's ClusterIP.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }

    /// Makes every certificate the cluster needs in `dir`.
    pub fn create(dir: &Path, node_name: &str, node_ip: Ipv4Addr) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=spry-test-cluster-ca",
            "-keyout",
            &path(&pki.ca_key()),
            "-out",
            &path(&pki.ca_cert()),
        ])?;
        let apiserver_names = format!(
            "subjectAltName=IP:127.0.0.1,IP:{node_ip},IP:{KUBERNETES_SERVICE_IP},DNS:localhost,\
             DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth"
        );
        pki.issue("apiserver", "/CN=kube-apiserver", &apiserver_names)?;
        pki.issue(
            "admin",
            "/O=system:masters/CN=spry-test-admin",
            "extendedKeyUsage=clientAuth",
        )?;
        pki.issue(
            "kubelet",
            &format!("/O=system:nodes/CN=system:node:{node_name}"),
            &format!(
                "subjectAltName=IP:{node_ip},DNS:{node_name}\nextendedKeyUsage=serverAuth,clientAuth"
            ),
        )?;
        openssl(&["genrsa", "-out", &path(&pki.sa_key()), "2048"])?;
        openssl(&[
            "rsa",
            "-in",
            &path(&pki.sa_key()),
            "-pubout",
            "-out",
            &path(&pki.sa_pub()),
        ])?;
        Ok(pki)
    }

    /// A key and a certificate signed by the CA, with `extensions` (openssl extfile lines).
    fn issue(&self, name: &str, subject: &str, extensions: &str) -> Result<()> {
        let (key, cert) = (self.key(name), self.cert(name));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext, format!("{extensions}\n"))
            .with_context(|| format!("writing {}", ext.display()))?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &path(&key),
            "-out",
            &path(&csr),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path(&csr),
            "-CA",
            &path(&self.ca_cert()),
            "-CAkey",
            &path(&self.ca_key()),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &path(&ext),
            "-out",
            &path(&cert),
        ])?;
        Ok(())
    }

    /// A kubeconfig for `identity` (`admin`, `kubelet`: a certificate made by `create`)
    /// against `server`.
    pub fn kubeconfig(&self, server: &str, identity: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: spry-test\n  cluster:\n    \
             server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {identity}\n  user:\n    \
             client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: spry-test\n  \
             context:\n    cluster: spry-test\n    user: {identity}\ncurrent-context: spry-test\n",
            ca = path(&self.ca_cert()),
            cert = path(&self.cert(identity)),
            key = path(&self.key(identity)),
        )
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn openssl(args: &[&str]) -> Result<()> {
    run_checked(Command::new("openssl").args(args))
        .context("openssl (apt install openssl) failed making the test cluster's certificates")?;
    Ok(())
}
