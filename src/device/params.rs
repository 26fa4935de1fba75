//! The `params` node of a VBD: which RBD image a virtual disk is, and how to reach its cluster.
//!
//! Owns: parsing the operator's (or the toolstack's) disk target string into a [`DiskSpec`].
//! Trusts: nothing; the string comes from xenstore (written by the toolstack, a hotplug script or
//! the CSI sidecar) and every malformed part is a [`ParamsError`] that names it.
//! Must never: open files or talk to the cluster — resolution happens in the storage layer.
//!
//! Two forms are accepted (documented for operators in `docs/deployment.md`):
//!
//! - QEMU's: `rbd:<pool>/[<namespace>/]<image>[@<snap>][:<key>=<value>]...`, with `\` escaping
//!   the next character (so `:`, `@`, `/` and `\` can appear in names and values). Keys
//!   `id`, `conf`, `keyring`, `key`, `engine` (`auto`, `direct`, `librbd`), `rbd_cache` and
//!   `exclusive` (keep the exclusive lock when other clients ask for it, krbd's option),
//!   `io_timeout` (seconds after which an unanswered request fails; 0 waits for ever) and
//!   `stall_warn` (seconds after which a waiting request is reported) are ours; any other key
//!   is passed to librados as a configuration option (e.g. `mon_host`), exactly as QEMU does.
//! - ceph-csi's volume handle: `csi:<handle>[:<key>=<value>]...` where the handle is
//!   `<version:4 hex>-<len:4 hex>-<clusterID>-<poolID:16 hex>-<uuid>` (ceph-csi's
//!   `CSIIdentifier`); the image is `<prefix><uuid>` with prefix `csi-vol-` unless the option
//!   `prefix=` says otherwise, the pool is given by its id and `namespace=` sets the RADOS
//!   namespace (ceph-csi keeps it in its cluster config, not in the handle).
//!
//! Secrets: `params` may carry a cephx key (`key=`). Errors reach the VBD's xenstore `error`
//! node (which the hotplug script copies to `hotplug-error`, and libxl logs), the serve log and
//! `rbdback status`, so every piece of `params` an error holds is a [`Shown`], built by
//! [`redact`]: no [`ParamsError`] can hold (nor print) the key.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

use crate::rados::direct::LockPolicy;
use crate::rados::{Encryption, EncryptionFormat};
pub use crate::rados::{EngineChoice, ImageSpec, PoolRef};

/// A parsed disk target: what the storage layer opens, plus where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image and how to reach its cluster (`read_only` is decided by the VBD's `mode`).
    pub target: ImageSpec,
    /// ceph-csi cluster id when the disk was given as a CSI handle.
    pub csi_cluster_id: Option<String>,
    /// `io_timeout=`: fail requests unanswered after this long (zero: wait for ever);
    /// `None`: the serve default.
    pub io_timeout: Option<Duration>,
    /// `stall_warn=`: report requests waiting longer than this; `None`: the serve default.
    pub stall_warn: Option<Duration>,
}

/// A malformed `params` value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParamsError {
    /// Neither `rbd:` nor `csi:`.
    #[error("params must start with `rbd:` or `csi:` (got {0:?})")]
    UnknownScheme(Shown),
    /// `rbd:` without `pool/image`.
    #[error("params {0:?} has no `<pool>/<image>`")]
    MissingImage(Shown),
    /// Too many `/` parts.
    #[error("params {0:?} has more than `<pool>/<namespace>/<image>`")]
    TooManyParts(Shown),
    /// An empty pool, namespace, image or snapshot name.
    #[error("params {0:?} has an empty {1} name")]
    EmptyName(Shown, &'static str),
    /// An option without `=`.
    #[error("option {0:?} is not `key=value`")]
    BadOption(Shown),
    /// An option for librados whose name no Ceph option has (a mistyped escape, a stray
    /// `=`): refused here, so that the value never reaches librados' own messages.
    #[error("option {0:?} does not name a Ceph option (letters, digits, `_`, `-` and blanks)")]
    BadOptionName(Shown),
    /// An option with a bad value.
    #[error("option {key}={value:?}: {why}")]
    BadValue {
        /// Option key.
        key: String,
        /// The rejected value.
        value: Shown,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A dangling `\` at the end.
    #[error("params {0:?} ends in a lone `\\`")]
    DanglingEscape(Shown),
    /// A ceph-csi handle that does not follow the documented layout.
    #[error("ceph-csi volume handle {0:?} is malformed: {1}")]
    BadCsiHandle(Shown, &'static str),
}

/// What is shown in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// Text of a `params` value as an error shows it: built only by [`Shown::params`] and
/// [`Shown::value`], which redact any inline key, so it never holds one.
#[derive(Clone, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    /// `params`, or a piece of it (an option, a handle), through [`redact`].
    pub fn params(raw: &str) -> Shown {
        Shown(redact(raw))
    }

    /// The value of option `key`: [`REDACTED`] when `key` is the inline secret's.
    pub fn value(key: &str, value: &str) -> Shown {
        if is_secret_key(key) {
            Shown(REDACTED.to_owned())
        } else {
            Shown(value.to_owned())
        }
    }

    /// The shown text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether an option name is the inline secret's: `key`, in any case and with any blanks
/// around it (librados' own spelling rules vary; redacting too much is harmless).
fn is_secret_key(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("key")
}

/// `params` text with the value of every `key=` replaced by [`REDACTED`]: the value runs from
/// the `=` to the next unescaped `:` (or the end). `key` counts where an option name could
/// start (the beginning, after a `:`, escaped or not, or after a blank or quote), in any case,
/// with `\` before its `=` or not, so that a mistyped escape cannot show the secret either.
pub fn redact(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut copied = 0; // raw[..copied] is in `out`
    let mut i = 0;
    while i < b.len() {
        let at_start = i == 0 || matches!(b[i - 1], b':' | b' ' | b'\t' | b'"' | b'\'');
        if !(at_start && b.len() - i >= 3 && b[i..i + 3].eq_ignore_ascii_case(b"key")) {
            i += 1;
            continue;
        }
        // `key`, blanks, an optional `\`, then `=`
        let mut j = i + 3;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if b.get(j) == Some(&b'\\') {
            j += 1;
        }
        if b.get(j) != Some(&b'=') {
            i += 1;
            continue;
        }
        j += 1;
        // the value: up to the next unescaped `:`
        while j < b.len() && b[j] != b':' {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        let end = j.min(b.len());
        out.push_str(&raw[copied..i]);
        out.push_str("key=");
        out.push_str(REDACTED);
        copied = end;
        i = end;
    }
    out.push_str(&raw[copied..]);
    out
}

/// Splits `s` at unescaped `sep`, unescaping `\x` into `x` in every piece.
fn split_escaped(s: &str, sep: char, whole: &str) -> Result<Vec<String>, ParamsError> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => push_char(&mut out, '\\', Some(n)),
                None => return Err(ParamsError::DanglingEscape(Shown::params(whole))),
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            push_char(&mut out, c, None);
        }
    }
    Ok(out)
}

/// Appends `c` (or an escape kept for a later split level) to the last piece.
fn push_char(out: &mut [String], c: char, escaped: Option<char>) {
    if let Some(last) = out.last_mut() {
        last.push(c);
        if let Some(n) = escaped {
            last.push(n);
        }
    }
}

/// Removes one level of `\` escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A [`ParamsError::BadValue`] (the value shown through [`Shown::value`]).
fn bad_value(key: &str, value: &str, why: &'static str) -> ParamsError {
    ParamsError::BadValue {
        key: key.to_owned(),
        value: Shown::value(key, value),
        why,
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ParamsError> {
    match value {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(bad_value(key, value, "expected true or false")),
    }
}

/// Seconds as a duration: a non-negative number (fractions allowed), at most a year.
pub fn parse_seconds(key: &str, value: &str) -> Result<Duration, ParamsError> {
    let bad = |why| bad_value(key, value, why);
    let secs: f64 = value.trim().parse().map_err(|_| bad("expected seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad("expected a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(365 * 86400))
        .ok_or_else(|| bad("at most a year"))
}

fn nonempty(name: String, what: &'static str, whole: &str) -> Result<String, ParamsError> {
    if name.is_empty() {
        Err(ParamsError::EmptyName(Shown::params(whole), what))
    } else {
        Ok(name)
    }
}

impl DiskSpec {
    fn new(pool: PoolRef, image: String) -> Self {
        let mut target = ImageSpec::new("", &image);
        target.pool = pool;
        DiskSpec {
            target,
            csi_cluster_id: None,
            io_timeout: None,
            stall_warn: None,
        }
    }

    /// Parses a `params` value (see the module docs for the grammar).
    pub fn parse(params: &str) -> Result<DiskSpec, ParamsError> {
        let params = params.trim();
        if let Some(rest) = params.strip_prefix("rbd:") {
            Self::parse_rbd(rest, params)
        } else if let Some(rest) = params.strip_prefix("csi:") {
            Self::parse_csi(rest, params)
        } else {
            Err(ParamsError::UnknownScheme(Shown::params(params)))
        }
    }

    fn parse_rbd(rest: &str, whole: &str) -> Result<DiskSpec, ParamsError> {
        let mut parts = split_escaped(rest, ':', whole)?.into_iter();
        let path = parts.next().unwrap_or_default();
        let (path, snap) = match split_escaped(&path, '@', whole)?.as_slice() {
            [p] => (p.clone(), None),
            [p, s] => (p.clone(), Some(nonempty(unescape(s), "snapshot", whole)?)),
            _ => return Err(ParamsError::EmptyName(Shown::params(whole), "snapshot")),
        };
        let names: Vec<String> = split_escaped(&path, '/', whole)?
            .iter()
            .map(|s| unescape(s))
            .collect();
        let mut spec = match names.as_slice() {
            [_] => return Err(ParamsError::MissingImage(Shown::params(whole))),
            [pool, image] => DiskSpec::new(
                PoolRef::Name(nonempty(pool.clone(), "pool", whole)?),
                nonempty(image.clone(), "image", whole)?,
            ),
            [pool, ns, image] => {
                let mut s = DiskSpec::new(
                    PoolRef::Name(nonempty(pool.clone(), "pool", whole)?),
                    nonempty(image.clone(), "image", whole)?,
                );
                s.target.namespace = Some(nonempty(ns.clone(), "namespace", whole)?);
                s
            }
            _ => return Err(ParamsError::TooManyParts(Shown::params(whole))),
        };
        spec.target.snapshot = snap;
        for opt in parts {
            spec.apply_option(&opt)?;
        }
        spec.check()?;
        Ok(spec)
    }

    fn parse_csi(rest: &str, whole: &str) -> Result<DiskSpec, ParamsError> {
        let mut parts = split_escaped(rest, ':', whole)?.into_iter();
        let raw_handle = parts.next().unwrap_or_default();
        let handle = unescape(&raw_handle);
        let bad = |why| ParamsError::BadCsiHandle(Shown::params(&raw_handle), why);
        // <version:4>-<clusterIDLen:4>-<clusterID>-<poolID:16>-<uuid:36>
        let version = handle.get(0..4).ok_or_else(|| bad("too short"))?;
        if !version.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("version is not 4 hex digits"));
        }
        if handle.get(4..5) != Some("-") || handle.get(9..10) != Some("-") {
            return Err(bad(
                "expected `-` after the version and the cluster id length",
            ));
        }
        let len_hex = handle.get(5..9).ok_or_else(|| bad("too short"))?;
        let cluster_len =
            usize::from_str_radix(len_hex, 16).map_err(|_| bad("cluster id length is not hex"))?;
        let cluster_end = 10 + cluster_len;
        let cluster = handle
            .get(10..cluster_end)
            .ok_or_else(|| bad("shorter than its cluster id length"))?;
        let tail = handle
            .get(cluster_end..)
            .and_then(|t| t.strip_prefix('-'))
            .ok_or_else(|| bad("expected `-` after the cluster id"))?;
        let pool_hex = tail
            .get(0..16)
            .ok_or_else(|| bad("no 16-hex-digit pool id"))?;
        let pool_id =
            i64::from_str_radix(pool_hex, 16).map_err(|_| bad("pool id is not 16 hex digits"))?;
        let uuid = tail
            .get(16..)
            .and_then(|t| t.strip_prefix('-'))
            .ok_or_else(|| bad("expected `-` after the pool id"))?;
        if uuid.len() != 36 || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(bad("object uuid is not a 36-character uuid"));
        }
        let mut spec = DiskSpec::new(PoolRef::Id(pool_id), format!("csi-vol-{uuid}"));
        spec.csi_cluster_id = Some(cluster.to_owned());
        let uuid = uuid.to_owned();
        for opt in parts {
            if let Some(prefix) = unescape(&opt).strip_prefix("prefix=") {
                spec.target.image = format!("{prefix}{uuid}");
                continue;
            }
            spec.apply_option(&opt)?;
        }
        spec.check()?;
        Ok(spec)
    }

    /// What single options cannot tell.
    fn check(&self) -> Result<(), ParamsError> {
        match &self.target.encryption {
            Some(e) if e.passphrase_file.is_empty() => Err(bad_value(
                "encryption_format",
                &format!("{:?}", e.format).to_lowercase(),
                "needs encryption_passphrase_file",
            )),
            _ => Ok(()),
        }
    }

    fn apply_option(&mut self, opt: &str) -> Result<(), ParamsError> {
        // The value is everything after the first unescaped `=`: cephx keys are base64 and
        // end in `=` (`key=AQB...==`), as QEMU's and krbd's option parsers allow.
        let pieces = split_escaped(opt, '=', opt)?;
        let (key, value) = match pieces.split_first() {
            Some((k, rest)) if !rest.is_empty() => (unescape(k), unescape(&rest.join("="))),
            _ => return Err(ParamsError::BadOption(Shown::params(opt))),
        };
        if key.is_empty() {
            return Err(ParamsError::BadOption(Shown::params(opt)));
        }
        match key.as_str() {
            "id" => self.target.client_id = nonempty(value, "client id", opt)?,
            "conf" => self.target.conf = Some(value),
            "keyring" => self.target.keyring = Some(value),
            "key" => self.target.key = Some(value.into()),
            "namespace" => self.target.namespace = Some(nonempty(value, "namespace", opt)?),
            "engine" => {
                self.target.engine = match value.as_str() {
                    "auto" => EngineChoice::Auto,
                    "direct" => EngineChoice::Direct,
                    "librbd" => EngineChoice::Librbd,
                    _ => return Err(bad_value(&key, &value, "expected auto, direct or librbd")),
                }
            }
            "rbd_cache" => self.target.rbd_cache = parse_bool(&key, &value)?,
            "encryption_format" => {
                let format = match value.as_str() {
                    "luks1" => EncryptionFormat::Luks1,
                    "luks2" => EncryptionFormat::Luks2,
                    _ => return Err(bad_value(&key, &value, "expected luks1 or luks2")),
                };
                let file = self.target.encryption.take().map(|e| e.passphrase_file);
                self.target.encryption = Some(Encryption {
                    format,
                    passphrase_file: file.unwrap_or_default(),
                });
            }
            "encryption_passphrase_file" => {
                let file = nonempty(value, "encryption passphrase file", opt)?;
                let format = self
                    .target
                    .encryption
                    .take()
                    .map_or(EncryptionFormat::Luks2, |e| e.format);
                self.target.encryption = Some(Encryption {
                    format,
                    passphrase_file: file,
                });
            }
            "exclusive" => {
                self.target.lock_policy = if parse_bool(&key, &value)? {
                    LockPolicy::Refuse
                } else {
                    LockPolicy::HandOver
                }
            }
            "io_timeout" => self.io_timeout = Some(parse_seconds(&key, &value)?),
            "stall_warn" => {
                let d = parse_seconds(&key, &value)?;
                if d.is_zero() {
                    return Err(bad_value(&key, &value, "must be more than 0 seconds"));
                }
                self.stall_warn = Some(d);
            }
            _ if !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ' ')) =>
            {
                return Err(ParamsError::BadOptionName(Shown::params(opt)))
            }
            _ => self.target.conf_options.push((key, value)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_form_with_everything() {
        let s = DiskSpec::parse(
            "rbd:vms/tenant1/disk0@base:id=xen:conf=/etc/ceph/ceph.conf:mon_host=127.0.0.1\\:6789:engine=librbd",
        )
        .unwrap();
        assert_eq!(s.target.pool, PoolRef::Name("vms".into()));
        assert_eq!(s.target.namespace.as_deref(), Some("tenant1"));
        assert_eq!(s.target.image, "disk0");
        assert_eq!(s.target.snapshot.as_deref(), Some("base"));
        assert_eq!(s.target.client_id, "xen");
        assert_eq!(s.target.conf.as_deref(), Some("/etc/ceph/ceph.conf"));
        assert_eq!(s.target.engine, EngineChoice::Librbd);
        assert_eq!(s.target.lock_policy, LockPolicy::HandOver);
        let x = DiskSpec::parse("rbd:p/i:exclusive=on").unwrap();
        assert_eq!(x.target.lock_policy, LockPolicy::Refuse);
        assert_eq!(
            s.target.conf_options,
            vec![("mon_host".to_owned(), "127.0.0.1:6789".to_owned())]
        );
    }

    #[test]
    fn an_inline_cephx_key_keeps_its_base64_padding() {
        let s =
            DiskSpec::parse("rbd:p/i:id=xen:key=AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ==").unwrap();
        assert_eq!(
            s.target.key.as_deref(),
            Some("AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ==")
        );
        assert!(!format!("{s:?}").contains("AQBHLcdl"), "{s:?}");
        assert!(matches!(
            DiskSpec::parse("rbd:p/i:novalue"),
            Err(ParamsError::BadOption(_))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:p/i:=v"),
            Err(ParamsError::BadOption(_))
        ));
    }

    #[test]
    fn io_timeout_and_stall_warn() {
        let s = DiskSpec::parse("rbd:p/i:io_timeout=5:stall_warn=2.5").unwrap();
        assert_eq!(s.io_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.stall_warn, Some(Duration::from_millis(2500)));
        assert!(s.target.conf_options.is_empty());
        let s = DiskSpec::parse("rbd:p/i:io_timeout=0").unwrap();
        assert_eq!(s.io_timeout, Some(Duration::ZERO));
        let d = DiskSpec::parse("rbd:p/i").unwrap();
        assert_eq!((d.io_timeout, d.stall_warn), (None, None));
        for bad in [
            "io_timeout=-1",
            "io_timeout=soon",
            "io_timeout=inf",
            "io_timeout=1e12",
            "stall_warn=0",
        ] {
            let e = DiskSpec::parse(&format!("rbd:p/i:{bad}")).unwrap_err();
            assert!(matches!(e, ParamsError::BadValue { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn encryption_options() {
        let s = DiskSpec::parse(
            r"rbd:p/i:encryption_format=luks1:encryption_passphrase_file=/etc/ceph/p\:1",
        )
        .unwrap();
        let e = s.target.encryption.unwrap();
        assert_eq!(e.format, EncryptionFormat::Luks1);
        assert_eq!(e.passphrase_file, "/etc/ceph/p:1");
        // the file alone means LUKS2, in either order
        let s = DiskSpec::parse("rbd:p/i:encryption_passphrase_file=/k").unwrap();
        assert_eq!(s.target.encryption.unwrap().format, EncryptionFormat::Luks2);
        let s = DiskSpec::parse("rbd:p/i:encryption_passphrase_file=/k:encryption_format=luks1")
            .unwrap();
        assert_eq!(s.target.encryption.unwrap().format, EncryptionFormat::Luks1);
        let e = DiskSpec::parse("rbd:p/i:encryption_format=luks2").unwrap_err();
        assert!(
            e.to_string().contains("needs encryption_passphrase_file"),
            "{e}"
        );
        let e = DiskSpec::parse("rbd:p/i:encryption_format=aes").unwrap_err();
        assert!(e.to_string().contains("luks1 or luks2"), "{e}");
        assert!(DiskSpec::parse("rbd:p/i")
            .unwrap()
            .target
            .encryption
            .is_none());
    }

    #[test]
    fn qemu_form_minimal_defaults() {
        let s = DiskSpec::parse("rbd:rbd/test").unwrap();
        assert_eq!(s.target.pool, PoolRef::Name("rbd".into()));
        assert_eq!(s.target.image, "test");
        assert_eq!(s.target.client_id, "admin");
        assert_eq!(s.target.engine, EngineChoice::Auto);
        assert!(!s.target.rbd_cache);
        assert!(s.target.snapshot.is_none() && s.target.namespace.is_none());
    }

    #[test]
    fn escaped_separators_stay_in_names() {
        let s = DiskSpec::parse("rbd:p/we\\@ird\\:name").unwrap();
        assert_eq!(s.target.image, "we@ird:name");
    }

    #[test]
    fn malformed_forms_are_named() {
        assert!(matches!(
            DiskSpec::parse("/dev/sda"),
            Err(ParamsError::UnknownScheme(_))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:onlypool"),
            Err(ParamsError::MissingImage(_))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:a/b/c/d"),
            Err(ParamsError::TooManyParts(_))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:/img"),
            Err(ParamsError::EmptyName(_, "pool"))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:p/i@"),
            Err(ParamsError::EmptyName(_, "snapshot"))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:p/i:noequals"),
            Err(ParamsError::BadOption(_))
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:p/i:engine=fast"),
            Err(ParamsError::BadValue { .. })
        ));
        assert!(matches!(
            DiskSpec::parse("rbd:p/i\\"),
            Err(ParamsError::DanglingEscape(_))
        ));
    }

    /// A cephx key as `ceph auth get-key` prints it.
    const SECRET: &str = "AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ==";

    /// Parses `params` (which must fail) and checks that no form of the error shows the
    /// secret: its Display, its Debug, and the chain a VBD writes to its `error` node.
    fn refused_without_secret(params: &str) -> ParamsError {
        let e = DiskSpec::parse(params).unwrap_err();
        let vbd = crate::device::vbd::VbdError::Params(e.clone());
        for shown in [e.to_string(), format!("{e:?}"), crate::chain(&vbd)] {
            assert!(!shown.contains("AQBHLc"), "{params}: {shown}");
            assert!(!shown.contains("bGQ=="), "{params}: {shown}");
        }
        e
    }

    #[test]
    fn no_params_error_shows_an_inline_key() {
        let k = SECRET;
        type Case = (String, fn(&ParamsError) -> bool);
        let cases: Vec<Case> = vec![
            (format!("RBD:p/i:key={k}"), |e| {
                matches!(e, ParamsError::UnknownScheme(_))
            }),
            (format!("rbd:onlypool:key={k}"), |e| {
                matches!(e, ParamsError::MissingImage(_))
            }),
            (format!("rbd:a/b/c/d:key={k}:id=x"), |e| {
                matches!(e, ParamsError::TooManyParts(_))
            }),
            (format!("rbd:/img:key={k}"), |e| {
                matches!(e, ParamsError::EmptyName(_, "pool"))
            }),
            (format!("rbd:p/i@:key={k}"), |e| {
                matches!(e, ParamsError::EmptyName(_, "snapshot"))
            }),
            (format!("rbd:p/i@a@b:key={k}"), |e| {
                matches!(e, ParamsError::EmptyName(_, "snapshot"))
            }),
            (format!("rbd:p//i:key={k}"), |e| {
                matches!(e, ParamsError::EmptyName(_, "namespace"))
            }),
            (format!("rbd:p/i:key={k}:id="), |e| {
                matches!(e, ParamsError::EmptyName(_, "client id"))
            }),
            (format!("rbd:p/i:key={k}:oops"), |e| {
                matches!(e, ParamsError::BadOption(_))
            }),
            // a mistyped escape hides the `=` from the parser, not the key from the message
            (format!(r"rbd:p/i:key\={k}"), |e| {
                matches!(e, ParamsError::BadOptionName(_))
            }),
            (
                r"rbd:p/i:key\=AQBHLcdl2Xq0JxAAwgDY1h6nD3pbkEV7mP8bGQ".to_owned(),
                |e| matches!(e, ParamsError::BadOption(_)),
            ),
            (format!("rbd:p/i:key={k}:engine=fast"), |e| {
                matches!(e, ParamsError::BadValue { .. })
            }),
            (format!("rbd:p/i:key={k}:encryption_format=luks2"), |e| {
                matches!(e, ParamsError::BadValue { .. })
            }),
            (format!(r"rbd:p/i:key={k}\"), |e| {
                matches!(e, ParamsError::DanglingEscape(_))
            }),
            (format!(r"rbd:p/i:key={k}:conf=/x\"), |e| {
                matches!(e, ParamsError::DanglingEscape(_))
            }),
            (format!("csi:0001-00ff-short:key={k}"), |e| {
                matches!(e, ParamsError::BadCsiHandle(..))
            }),
            (format!(r"csi:0001\:key={k}"), |e| {
                matches!(e, ParamsError::BadCsiHandle(..))
            }),
        ];
        for (params, variant) in cases {
            let e = refused_without_secret(&params);
            assert!(variant(&e), "{params}: {e:?}");
        }
        // where the whole params is shown, the key's place says it was there
        let e = refused_without_secret(&format!("rbd:onlypool:id=xen:key={k}:conf=/c"));
        assert_eq!(
            e.to_string(),
            "params \"rbd:onlypool:id=xen:key=<redacted>:conf=/c\" has no `<pool>/<image>`"
        );
    }

    #[test]
    fn redaction_runs_to_the_next_unescaped_colon() {
        assert_eq!(
            redact("rbd:p/i:key=AB\\:CD:id=x"),
            "rbd:p/i:key=<redacted>:id=x"
        );
        assert_eq!(
            redact("rbd:p/i:KEY = AB:key=CD"),
            "rbd:p/i:key=<redacted>:key=<redacted>"
        );
        assert_eq!(redact("rbd:p/i:key=AB\\"), "rbd:p/i:key=<redacted>");
        // other options keep their values; `keyring` is a path, not a secret
        assert_eq!(
            redact("rbd:p/key=i:keyring=/k:monkey=x:mon_host=h\\:1"),
            "rbd:p/key=i:keyring=/k:monkey=x:mon_host=h\\:1"
        );
        assert_eq!(
            redact("rbd:p/i:key=ü\\é:id=x"),
            "rbd:p/i:key=<redacted>:id=x"
        );
        assert_eq!(Shown::value("key", SECRET).as_str(), REDACTED);
        assert_eq!(Shown::value("id", "xen").as_str(), "xen");
    }

    #[test]
    fn csi_handle_resolves_pool_id_and_image() {
        let h = "0001-0024-fc0b5b1c-ad3e-4e4b-9b1c-3a5e0f6a7a11-0000000000000002-b0285c97-a0ce-11eb-8c66-0a580a810086";
        let s = DiskSpec::parse(&format!("csi:{h}:id=csi-rbd-node")).unwrap();
        assert_eq!(s.target.pool, PoolRef::Id(2));
        assert_eq!(
            s.target.image,
            "csi-vol-b0285c97-a0ce-11eb-8c66-0a580a810086"
        );
        assert_eq!(
            s.csi_cluster_id.as_deref(),
            Some("fc0b5b1c-ad3e-4e4b-9b1c-3a5e0f6a7a11")
        );
        assert_eq!(s.target.client_id, "csi-rbd-node");
        let s = DiskSpec::parse(&format!("csi:{h}:prefix=k8s-")).unwrap();
        assert_eq!(s.target.image, "k8s-b0285c97-a0ce-11eb-8c66-0a580a810086");
    }

    #[test]
    fn csi_handle_malformed_is_rejected() {
        for bad in [
            "csi:",
            "csi:0001",
            "csi:0001-00ff-short",
            "csi:0001-0004-abcd-zzzzzzzzzzzzzzzz-b0285c97-a0ce-11eb-8c66-0a580a810086",
            "csi:0001-0004-abcd-0000000000000002-notauuid",
        ] {
            assert!(
                matches!(DiskSpec::parse(bad), Err(ParamsError::BadCsiHandle(..))),
                "{bad}"
            );
        }
    }
}
