//! The NBD tests' side of the server: ferry's NBD server on a runtime of its own (so the tests
//! use plain blocking I/O and `std::process`), a raw client ([`raw`]) and TLS credentials
//! ([`pki`]).

pub mod pki;
pub mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry::nbd::{Export, NbdServer, ServerConfig};

pub use raw::*;

use crate::files::sparse_file;

/// A server on a private multi-threaded runtime, and a temp dir for its files.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: NbdServer,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(config: ServerConfig) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let server = rt
            .block_on(NbdServer::bind(addr, config))
            .expect("bind on port 0");
        let dir = tempfile::tempdir().expect("temp dir");
        TestServer { rt, server, dir }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn url(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr(), name)
    }

    /// Creates a sparse file of `size` in the temp dir and serves it as `name`.
    pub fn export_new(&self, name: &str, size: u64, read_only: bool) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.raw"));
        sparse_file(&path, size);
        self.export(name, &path, read_only);
        path
    }

    pub fn export(&self, name: &str, path: &Path, read_only: bool) {
        self.server
            .add_export(Export {
                name: name.into(),
                path: path.into(),
                read_only,
            })
            .expect("add export");
    }

    /// Stops the server cleanly; the temp dir (returned) lives on for checks of the files.
    pub fn shutdown(self) -> tempfile::TempDir {
        let TestServer { rt, server, dir } = self;
        rt.block_on(server.shutdown()).expect("clean shutdown");
        dir
    }
}
