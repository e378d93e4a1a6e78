//! What the TFTP server serves: files of the snapshot current when the request
//! arrived (a transfer keeps the file it opened, across snapshot switches).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::daemon::Daemon;
use std::os::fd::AsFd;

use crate::tftp::{from_beneath, OpenError, Resolver, Source};

pub struct TftpResolver {
    d: Arc<Daemon>,
}

impl TftpResolver {
    pub fn new(d: Arc<Daemon>) -> TftpResolver {
        TftpResolver { d }
    }
}

impl Resolver for TftpResolver {
    fn open(&self, path: &str, _client: SocketAddr) -> Result<Source, OpenError> {
        let Some(snap) = self.d.current() else {
            return Err(OpenError::NotFound);
        };
        from_beneath(crate::fsutil::open_beneath(
            snap.root.as_fd(),
            &snap.dir,
            path,
        ))
    }
}
