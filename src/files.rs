//! Reading the files that flags name: whole files, secrets and PEM certificates. Every
//! error names the flag and the path and never quotes the file's content.

use std::path::Path;

use rustls_pki_types::{CertificateDer, pem::PemObject};

use crate::error::SetupError;

/// The bytes of `flag`'s file.
pub(crate) fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>, SetupError> {
    std::fs::read(path).map_err(|e| SetupError::file(flag, path, format!("cannot read: {e}")))
}

/// A secret from `flag`'s file: UTF-8, without its trailing newline, not empty.
pub(crate) fn read_secret(path: &Path, flag: &'static str) -> Result<String, SetupError> {
    let text = String::from_utf8(read(path, flag)?)
        .map_err(|_| SetupError::file(flag, path, "not UTF-8 text"))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(SetupError::file(flag, path, "empty"));
    }
    Ok(secret.to_owned())
}

/// The certificates of a PEM file, at least one, each parsed as X.509, and the PEM.
pub(crate) fn read_certificates(
    path: &Path,
    flag: &'static str,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), SetupError> {
    let pem = read(path, flag)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SetupError::file(flag, path, format!("not PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(SetupError::file(
            flag,
            path,
            "no CERTIFICATE block in the PEM",
        ));
    }
    for (i, der) in certificates.iter().enumerate() {
        webpki::EndEntityCert::try_from(der)
            .map_err(|e| SetupError::file(flag, path, format!("certificate {}: {e}", i + 1)))?;
    }
    Ok((pem, certificates))
}
