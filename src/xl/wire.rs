//! Stream mode of the control link: once the agent answers `xl_receiving`, the link stops
//! carrying JSON messages and carries `xl`'s own stream both ways, as chunks:
//!
//! ```text
//!  chunk = tag u8, length u32 BE, length bytes (only for Data; at most MAX_FRAME)
//!  Data   'D'  bytes of xl's stream, in order
//!  Final  'F'  source → agent: every mirror finished its final sync; the agent flushes the
//!              images and stops serving them, in the background (the stream goes on)
//!  Barrier 'B' source → agent: nothing after this reaches the receiver before that flush and
//!              stop are done (the libxl END record follows, after which it opens the images)
//!  Go     'G'  source → agent: the next bytes are "domain is yours, you are cleared to
//!              unpause": the point of no return; the agent journals that the images now belong
//!              to the domain, and keeps them whatever happens to the link
//!  Eof    'E'  this direction is finished (xl closed its end)
//! ```
//!
//! JSON would double every byte of guest memory; this framing costs 5 bytes per chunk and keeps
//! the frame cap of the JSON messages.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{ProtocolError, MAX_FRAME};

/// One chunk of stream mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Stream bytes.
    Data(Vec<u8>),
    /// The disks are final (source → agent).
    Final,
    /// What follows waits for the work `Final` started (source → agent).
    Barrier,
    /// The point of no return follows (source → agent).
    Go,
    /// This direction ended.
    Eof,
}

/// Writes one chunk (Data over [`MAX_FRAME`] is split by the caller; refused here).
pub async fn write_chunk<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunk: &Chunk,
) -> Result<(), ProtocolError> {
    match chunk {
        Chunk::Data(bytes) => {
            if bytes.len() > MAX_FRAME {
                return Err(ProtocolError::FrameTooLarge { len: bytes.len() });
            }
            let mut head = [b'D', 0, 0, 0, 0];
            head[1..].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
            w.write_all(&head).await?;
            w.write_all(bytes).await?;
        }
        Chunk::Final => w.write_all(b"F").await?,
        Chunk::Barrier => w.write_all(b"B").await?,
        Chunk::Go => w.write_all(b"G").await?,
        Chunk::Eof => w.write_all(b"E").await?,
    }
    w.flush().await?;
    Ok(())
}

/// Reads one chunk; the length is checked before anything is allocated.
pub async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R) -> Result<Chunk, ProtocolError> {
    let tag = r.read_u8().await?;
    match tag {
        b'D' => {
            let len = r.read_u32().await? as usize;
            if len > MAX_FRAME {
                return Err(ProtocolError::FrameTooLarge { len });
            }
            let mut bytes = vec![0u8; len];
            r.read_exact(&mut bytes).await?;
            Ok(Chunk::Data(bytes))
        }
        b'F' => Ok(Chunk::Final),
        b'B' => Ok(Chunk::Barrier),
        b'G' => Ok(Chunk::Go),
        b'E' => Ok(Chunk::Eof),
        other => Err(ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown stream chunk tag 0x{other:02x}"),
        ))),
    }
}

/// Sends stream bytes as Data chunks no bigger than a frame.
pub async fn send_data<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
) -> Result<(), String> {
    for piece in data.chunks(crate::protocol::MAX_FRAME) {
        write_chunk(w, &Chunk::Data(piece.to_vec()))
            .await
            .map_err(|e| format!("agent link: {}", crate::error_chain(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_caps() {
        let mut buf = Vec::new();
        for c in [
            Chunk::Data(b"abc".to_vec()),
            Chunk::Final,
            Chunk::Go,
            Chunk::Eof,
        ] {
            write_chunk(&mut buf, &c).await.expect("must succeed");
        }
        let mut r = &buf[..];
        assert_eq!(
            read_chunk(&mut r).await.expect("must succeed"),
            Chunk::Data(b"abc".to_vec())
        );
        assert_eq!(
            read_chunk(&mut r).await.expect("must succeed"),
            Chunk::Final
        );
        assert_eq!(read_chunk(&mut r).await.expect("must succeed"), Chunk::Go);
        assert_eq!(read_chunk(&mut r).await.expect("must succeed"), Chunk::Eof);
        let mut over = vec![b'D'];
        over.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(matches!(
            read_chunk(&mut &over[..]).await,
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert!(read_chunk(&mut &b"Z"[..]).await.is_err());
    }
}
