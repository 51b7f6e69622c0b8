//! Checks one transmission request against what was negotiated and the export's size, and
//! turns it into an [`Op`] or into the error the spec prescribes. Pure, so every rule is
//! unit-tested here; the connection only moves bytes and runs ops.
//!
//! Errors, as `doc/proto.md` asks: unknown command or flag `EINVAL`; writing a read-only
//! export `EPERM`; reading/trimming/querying past the end `EINVAL`, writing or zeroing past it
//! `ENOSPC`; a read longer than the maximum payload `EINVAL` with simple replies (the client
//! broke a MUST) or `EOVERFLOW` with chunked replies (the server may refuse such reads);
//! `NBD_CMD_BLOCK_STATUS` without a selected metadata context `EINVAL`.

use super::wire::{cflag, cmd, errno, ReplyStyle, Request, MAX_PAYLOAD};

/// A request that passed every check. `P` is the write payload: nothing (`()`) when the header
/// is checked, the bytes themselves once the connection has read them (see [`Op::with_payload`]),
/// so that a write without its data cannot reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op<P = ()> {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
        data: P,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    Disconnect,
}

impl Op {
    /// The same op with the write payload `data` attached (`None` for every other op, which
    /// carries none).
    pub(crate) fn with_payload<P>(self, data: Option<P>) -> Option<Op<P>> {
        Some(match self {
            Op::Write {
                offset, len, fua, ..
            } => Op::Write {
                offset,
                len,
                fua,
                data: data?,
            },
            Op::Read { offset, len, df } => Op::Read { offset, len, df },
            Op::Flush => Op::Flush,
            Op::Trim { offset, len, fua } => Op::Trim { offset, len, fua },
            Op::Cache { offset, len } => Op::Cache { offset, len },
            Op::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua,
            } => Op::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua,
            },
            Op::BlockStatus {
                offset,
                len,
                req_one,
            } => Op::BlockStatus {
                offset,
                len,
                req_one,
            },
            Op::Disconnect => Op::Disconnect,
        })
    }
}

/// A request refused before touching the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) errno: u32,
    pub(crate) message: String,
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) style: ReplyStyle,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) block_status: bool,
}

fn reject(errno: u32, message: String) -> Result<Op, Rejection> {
    Err(Rejection { errno, message })
}

/// Checks `req`. The caller has already handled the payload's framing (it reads or discards
/// exactly `req.payload_len(style)` bytes whatever this returns).
pub(crate) fn check(req: &Request, limits: &Limits) -> Result<Op, Rejection> {
    let chunked = limits.style.chunked();
    let extended = limits.style == ReplyStyle::Extended;
    let allowed = match req.command {
        cmd::DISC => return Ok(Op::Disconnect),
        cmd::READ => cflag::FUA | if chunked { cflag::DF } else { 0 },
        cmd::WRITE => cflag::FUA | if extended { cflag::PAYLOAD_LEN } else { 0 },
        cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        other => return reject(errno::EINVAL, format!("unknown command {other}")),
    };
    if req.flags & !allowed != 0 {
        return reject(
            errno::EINVAL,
            format!(
                "command flags {:#x} are not valid for command {}",
                req.flags, req.command
            ),
        );
    }
    let writes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && limits.read_only {
        return reject(errno::EPERM, "the export is read-only".into());
    }
    if matches!(req.command, cmd::READ | cmd::WRITE) && req.length > u64::from(MAX_PAYLOAD) {
        let errno = if req.command == cmd::READ && chunked {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        };
        return reject(
            errno,
            format!(
                "{} bytes is more than the maximum payload of {MAX_PAYLOAD}",
                req.length
            ),
        );
    }
    let fua = req.flags & cflag::FUA != 0;
    if req.command == cmd::FLUSH {
        return Ok(Op::Flush);
    }
    let past_end = match req.offset.checked_add(req.length) {
        Some(end) => end > limits.size,
        None => true,
    };
    if past_end {
        let errno = match req.command {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        return reject(
            errno,
            format!(
                "{} bytes at offset {} go past the end of the export ({} bytes)",
                req.length, req.offset, limits.size
            ),
        );
    }
    let (offset, len) = (req.offset, req.length);
    // Lengths of READ and WRITE were checked against MAX_PAYLOAD above.
    let short = u32::try_from(len).unwrap_or(MAX_PAYLOAD);
    match req.command {
        cmd::READ => Ok(Op::Read {
            offset,
            len: short,
            df: req.flags & cflag::DF != 0,
        }),
        cmd::WRITE => Ok(Op::Write {
            offset,
            len: short,
            fua,
            data: (),
        }),
        cmd::TRIM => Ok(Op::Trim { offset, len, fua }),
        cmd::CACHE => Ok(Op::Cache { offset, len }),
        cmd::WRITE_ZEROES => Ok(Op::WriteZeroes {
            offset,
            len,
            no_hole: req.flags & cflag::NO_HOLE != 0,
            fast: req.flags & cflag::FAST_ZERO != 0,
            fua,
        }),
        _ => {
            if !limits.block_status {
                return reject(errno::EINVAL, "no metadata context was selected".into());
            }
            if len == 0 {
                return reject(errno::EINVAL, "block status of an empty range".into());
            }
            Ok(Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & cflag::REQ_ONE != 0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn limits(style: ReplyStyle) -> Limits {
        Limits {
            style,
            size: SIZE,
            read_only: false,
            block_status: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno_of(r: Result<Op, Rejection>) -> u32 {
        r.expect_err("request should be rejected").errno
    }

    #[test]
    fn valid_requests_become_ops() {
        let l = limits(ReplyStyle::Structured);
        assert_eq!(
            check(&req(cmd::READ, cflag::DF, 0, 4096), &l),
            Ok(Op::Read {
                offset: 0,
                len: 4096,
                df: true
            })
        );
        assert_eq!(
            check(&req(cmd::WRITE, cflag::FUA, SIZE - 512, 512), &l),
            Ok(Op::Write {
                offset: SIZE - 512,
                len: 512,
                fua: true,
                data: ()
            })
        );
        assert_eq!(
            check(
                &req(
                    cmd::WRITE_ZEROES,
                    cflag::NO_HOLE | cflag::FAST_ZERO,
                    0,
                    SIZE
                ),
                &l
            ),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: SIZE,
                no_hole: true,
                fast: true,
                fua: false
            })
        );
        assert_eq!(check(&req(cmd::FLUSH, 0, 0, 0), &l), Ok(Op::Flush));
        assert_eq!(check(&req(cmd::DISC, 0xffff, 9, 9), &l), Ok(Op::Disconnect));
        // Effect lengths may exceed the payload limit with extended headers.
        let big = Limits {
            size: 1 << 40,
            ..limits(ReplyStyle::Extended)
        };
        assert_eq!(
            check(&req(cmd::TRIM, 0, 0, 1 << 40), &big),
            Ok(Op::Trim {
                offset: 0,
                len: 1 << 40,
                fua: false
            })
        );
    }

    #[test]
    fn out_of_range_gets_the_spec_errors() {
        let l = limits(ReplyStyle::Structured);
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, SIZE, 1), &l)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(check(&req(cmd::WRITE, 0, SIZE - 1, 2), &l)),
            errno::ENOSPC
        );
        assert_eq!(
            errno_of(check(&req(cmd::WRITE_ZEROES, 0, SIZE, 1), &l)),
            errno::ENOSPC
        );
        assert_eq!(
            errno_of(check(&req(cmd::TRIM, 0, u64::MAX, 2), &l)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(check(&req(cmd::BLOCK_STATUS, 0, SIZE, 1), &l)),
            errno::EINVAL
        );
        let message = check(&req(cmd::READ, 0, SIZE, 1), &l)
            .expect_err("past the end")
            .message;
        assert!(message.contains("past the end"), "{message}");
    }

    #[test]
    fn oversized_unknown_and_forbidden() {
        let s = limits(ReplyStyle::Simple);
        let c = limits(ReplyStyle::Structured);
        let too_big = u64::from(MAX_PAYLOAD) + 1;
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, 0, too_big), &s)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(check(&req(cmd::READ, 0, 0, too_big), &c)),
            errno::EOVERFLOW
        );
        assert_eq!(
            errno_of(check(&req(cmd::WRITE, 0, 0, too_big), &c)),
            errno::EINVAL
        );
        assert_eq!(errno_of(check(&req(99, 0, 0, 0), &c)), errno::EINVAL);
        assert_eq!(
            errno_of(check(&req(cmd::READ, cflag::NO_HOLE, 0, 1), &c)),
            errno::EINVAL
        );
        // DF needs chunked replies; PAYLOAD_LEN needs extended headers.
        assert_eq!(
            errno_of(check(&req(cmd::READ, cflag::DF, 0, 1), &s)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(check(&req(cmd::WRITE, cflag::PAYLOAD_LEN, 0, 1), &c)),
            errno::EINVAL
        );
        let e = limits(ReplyStyle::Extended);
        // QEMU's client leaves PAYLOAD_LEN off its writes; both forms are accepted.
        assert!(check(&req(cmd::WRITE, 0, 0, 1), &e).is_ok());
        assert!(check(&req(cmd::WRITE, cflag::PAYLOAD_LEN, 0, 1), &e).is_ok());
        assert_eq!(
            errno_of(check(&req(cmd::TRIM, cflag::PAYLOAD_LEN, 0, 1), &e)),
            errno::EINVAL
        );

        let ro = Limits {
            read_only: true,
            ..c
        };
        assert_eq!(
            errno_of(check(&req(cmd::WRITE, 0, 0, 1), &ro)),
            errno::EPERM
        );
        assert_eq!(errno_of(check(&req(cmd::TRIM, 0, 0, 1), &ro)), errno::EPERM);
        assert!(check(&req(cmd::READ, cflag::FUA, 0, 1), &ro).is_ok());

        let no_meta = Limits {
            block_status: false,
            ..c
        };
        assert_eq!(
            errno_of(check(&req(cmd::BLOCK_STATUS, 0, 0, 1), &no_meta)),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(check(&req(cmd::BLOCK_STATUS, 0, 0, 0), &c)),
            errno::EINVAL
        );
    }
}
