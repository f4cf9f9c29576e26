//! Device identifiers and signed credentials (SPEC §3). Pure functions: no
//! I/O, no MQTT, no store.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Milliseconds since the unix epoch, UTC (the broker's clock uses the same).
pub type Millis = i64;

type HmacSha256 = Hmac<Sha256>;

/// ProductKey `[A-Za-z0-9_-]{1,32}`.
pub fn valid_product_key(pk: &str) -> bool {
    (1..=32).contains(&pk.len())
        && pk
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// DeviceKey `[A-Za-z0-9_:-]{1,64}`.
pub fn valid_device_key(dk: &str) -> bool {
    (1..=64).contains(&dk.len())
        && dk
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':')
}

/// The user name a device sends: `{ProductKey}&{DeviceKey}&{timestamp_ms}`.
pub fn user_name(pk: &str, dk: &str, timestamp_ms: Millis) -> String {
    format!("{pk}&{dk}&{timestamp_ms}")
}

/// The client id a device sends: `{ProductKey}.{DeviceKey}`.
pub fn client_id(pk: &str, dk: &str) -> String {
    format!("{pk}.{dk}")
}

/// Lowercase hex HMAC-SHA256 of `message` keyed with `secret`.
pub fn sign(secret: &str, message: &str) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm is unreachable.
        Err(_) => return String::new(),
    };
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// User name and password for a device at `timestamp_ms`.
pub fn device_credentials(
    pk: &str,
    dk: &str,
    secret: &str,
    timestamp_ms: Millis,
) -> (String, String) {
    let user = user_name(pk, dk, timestamp_ms);
    let password = sign(secret, &user);
    (user, password)
}

/// A parsed, syntactically valid user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUser {
    pub product_key: String,
    pub device_key: String,
    pub timestamp_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("user name must be ProductKey&DeviceKey&timestamp")]
    UserNameShape,
    #[error("ProductKey must match [A-Za-z0-9_-]{{1,32}}")]
    ProductKey,
    #[error("DeviceKey must match [A-Za-z0-9_:-]{{1,64}}")]
    DeviceKey,
    #[error("timestamp must be unix time in milliseconds")]
    Timestamp,
    #[error("client id must be ProductKey.DeviceKey matching the user name")]
    ClientId,
}

/// Parses `{PK}&{DK}&{ts}` and checks identifier syntax.
pub fn parse_user_name(user: &str) -> Result<DeviceUser, IdentityError> {
    let mut parts = user.split('&');
    let (Some(pk), Some(dk), Some(ts), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdentityError::UserNameShape);
    };
    if !valid_product_key(pk) {
        return Err(IdentityError::ProductKey);
    }
    if !valid_device_key(dk) {
        return Err(IdentityError::DeviceKey);
    }
    if ts.is_empty() || ts.len() > 16 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdentityError::Timestamp);
    }
    let timestamp_ms = ts.parse::<Millis>().map_err(|_| IdentityError::Timestamp)?;
    Ok(DeviceUser {
        product_key: pk.to_owned(),
        device_key: dk.to_owned(),
        timestamp_ms,
    })
}

/// The client id must be empty (broker assigns `{PK}.{DK}`) or exactly `{PK}.{DK}`.
pub fn check_client_id(client_id: &str, user: &DeviceUser) -> Result<(), IdentityError> {
    if client_id.is_empty() {
        return Ok(());
    }
    let expected_len = user.product_key.len() + 1 + user.device_key.len();
    if client_id.len() == expected_len
        && client_id.starts_with(user.product_key.as_str())
        && client_id.as_bytes()[user.product_key.len()] == b'.'
        && client_id.ends_with(user.device_key.as_str())
    {
        Ok(())
    } else {
        Err(IdentityError::ClientId)
    }
}

/// Constant-time check of `password` against the expected signature, and of
/// the timestamp against `now` within `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("timestamp outside the allowed window")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
}

pub fn verify(
    secret: &str,
    user_name: &str,
    timestamp_ms: Millis,
    password: &[u8],
    now: Millis,
    window_ms: Millis,
) -> Result<(), SignatureError> {
    if (now - timestamp_ms).abs() > window_ms {
        return Err(SignatureError::Stale);
    }
    let Ok(hex_password) = std::str::from_utf8(password) else {
        return Err(SignatureError::Mismatch);
    };
    let Ok(given) = hex::decode(hex_password) else {
        return Err(SignatureError::Mismatch);
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return Err(SignatureError::Mismatch);
    };
    mac.update(user_name.as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)
}

/// A random secret: 32 lowercase hex characters (128 bits).
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_openssl() {
        // printf %s 'pk1&dev-1&1700000000000' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign("secret", "pk1&dev-1&1700000000000"),
            "daee6b7f33414218ef8862ddf3199958c4cfd6ba3c16eaef5f48fec4b4d917cb"
        );
    }

    #[test]
    fn parses_and_verifies() {
        let (user, pass) = device_credentials("pk1", "dev:1", "s3cret", 1_000_000);
        let parsed = parse_user_name(&user).expect("valid");
        assert_eq!(parsed.product_key, "pk1");
        assert_eq!(parsed.device_key, "dev:1");
        check_client_id("pk1.dev:1", &parsed).expect("client id");
        check_client_id("", &parsed).expect("empty client id");
        assert_eq!(
            check_client_id("pk1.dev:2", &parsed),
            Err(IdentityError::ClientId)
        );
        verify(
            "s3cret",
            &user,
            1_000_000,
            pass.as_bytes(),
            1_200_000,
            300_000,
        )
        .expect("ok");
        assert_eq!(
            verify(
                "s3cret",
                &user,
                1_000_000,
                pass.as_bytes(),
                1_400_000,
                300_000
            ),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(
                "other",
                &user,
                1_000_000,
                pass.as_bytes(),
                1_000_000,
                300_000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("s3cret", &user, 1_000_000, b"zz", 1_000_000, 300_000),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rejects_bad_identifiers() {
        assert_eq!(parse_user_name("a&b"), Err(IdentityError::UserNameShape));
        assert_eq!(
            parse_user_name("a&b&1&2"),
            Err(IdentityError::UserNameShape)
        );
        assert_eq!(parse_user_name("a b&dev&1"), Err(IdentityError::ProductKey));
        assert_eq!(
            parse_user_name(&format!("{}&dev&1", "p".repeat(33))),
            Err(IdentityError::ProductKey)
        );
        assert_eq!(parse_user_name("pk&d/ev&1"), Err(IdentityError::DeviceKey));
        assert_eq!(parse_user_name("pk&dev&-1"), Err(IdentityError::Timestamp));
        assert_eq!(parse_user_name("pk&dev&"), Err(IdentityError::Timestamp));
    }
}
