//! NBD: wire format, server and file backend.
