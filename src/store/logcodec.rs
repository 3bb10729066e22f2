//! How a log chunk is kept: Buildbot's `logCompressionMethod` and the
//! codes its `logchunks.compressed` column uses (0 raw, 1 gz, 2 bz2, 3
//! lz4, 4 zstd), so that a chunk says how to read it back whatever the
//! config says today.

use std::io::{Read, Write};

use anyhow::{bail, Context as _};

/// Buildbot's code of each method, as stored with each chunk.
pub const RAW: i64 = 0;
pub const GZ: i64 = 1;
pub const BZ2: i64 = 2;
pub const LZ4: i64 = 3;
pub const ZSTD: i64 = 4;

/// zstd's level: fast enough for log ingest above 30 MB/s on one core,
/// and most of the ratio of the higher levels on build output.
const ZSTD_LEVEL: i32 = 3;

/// `text` compressed with method `code`: (the code it is stored with, the
/// bytes). A chunk that does not get smaller is kept raw, as Buildbot does.
pub fn compress(code: i64, text: &[u8]) -> (i64, Vec<u8>) {
    let packed = match code {
        GZ => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text).and_then(|()| e.finish()).ok()
        }
        BZ2 => {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(text).and_then(|()| e.finish()).ok()
        }
        LZ4 => Some(lz4_flex::compress_prepend_size(text)),
        ZSTD => zstd::bulk::compress(text, ZSTD_LEVEL).ok(),
        _ => None,
    };
    match packed {
        Some(p) if p.len() < text.len() => (code, p),
        _ => (RAW, text.to_vec()),
    }
}

/// The text of a chunk stored with `code`.
pub fn decompress(code: i64, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    match code {
        RAW => return Ok(bytes.to_vec()),
        GZ => {
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .context("a gz log chunk does not decompress")?;
        }
        BZ2 => {
            bzip2::read::BzDecoder::new(bytes)
                .read_to_end(&mut out)
                .context("a bz2 log chunk does not decompress")?;
        }
        LZ4 => {
            out = lz4_flex::decompress_size_prepended(bytes)
                .map_err(|e| anyhow::anyhow!("an lz4 log chunk does not decompress: {e}"))?;
        }
        ZSTD => {
            zstd::stream::read::Decoder::new(bytes)
                .and_then(|mut d| d.read_to_end(&mut out))
                .context("a zstd log chunk does not decompress")?;
        }
        other => bail!("a log chunk is stored with compression {other}, which kiln does not know"),
    }
    Ok(out)
}

/// A chunk's text for readers: decompressed, and a chunk that cannot be
/// read says so in place rather than failing the whole log.
pub fn text_of(code: i64, bytes: &[u8]) -> String {
    match decompress(code, bytes) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("h[kiln] {e:#}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_reads_back_what_it_wrote_and_small_text_stays_raw() {
        let text: Vec<u8> = (0..2000)
            .flat_map(|i| format!("oline {i}: compiling dom/foo{i}.cpp\n").into_bytes())
            .collect();
        for code in [RAW, GZ, BZ2, LZ4, ZSTD] {
            let (stored, bytes) = compress(code, &text);
            assert_eq!(stored, code, "{code} keeps its method on text that shrinks");
            if code != RAW {
                assert!(
                    bytes.len() * 4 < text.len(),
                    "{code}: {} bytes",
                    bytes.len()
                );
            }
            assert_eq!(decompress(stored, &bytes).unwrap(), text, "{code}");
        }
        let (stored, bytes) = compress(ZSTD, b"ok\n");
        assert_eq!((stored, bytes.as_slice()), (RAW, &b"ok\n"[..]));
    }

    #[test]
    fn a_damaged_chunk_is_an_error_and_reads_as_a_note() {
        assert!(decompress(ZSTD, b"not zstd").is_err());
        assert!(decompress(9, b"x").is_err());
        assert!(text_of(GZ, b"nope").starts_with("h[kiln] a gz log chunk does not decompress"));
    }
}
