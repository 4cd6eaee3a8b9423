//! Per-device secrets for tracker apps that cannot hold a JWT (Traccar Client puts its
//! credential in the server URL, OwnTracks sends HTTP Basic).
//!
//! A device's secret is the HMAC-SHA256 of its id under the deployment's key, base64url
//! without padding (43 characters). Checking one costs one HMAC and no database read; the
//! operator issues it with `geostream-local device-secret DEVICE_ID` holding the same key, and
//! revokes a device by listing it (`REVOKED_DEVICES`). Rotating the key revokes every secret
//! at once.

use std::collections::HashSet;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The shortest key accepted: 256 bits, as much as the HMAC's output.
pub const MIN_KEY_BYTES: usize = 32;

/// What the MAC is computed over before the device id, so that the key signs nothing else
/// by accident.
const LABEL: &[u8] = b"geostream-device-secret-v1\0";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the device secret key is {0} bytes long; at least {MIN_KEY_BYTES} are needed (for example the output of `openssl rand -base64 32`)")]
pub struct KeyTooShort(pub usize);

/// How a presented secret compares with the device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretCheck {
    Valid,
    /// No secret was presented.
    Missing,
    /// A secret was presented and is not the device's.
    Wrong,
    /// The secret is the device's, and the device is revoked.
    Revoked,
}

/// The deployment's key and deny-list.
#[derive(Clone)]
pub struct DeviceSecrets {
    mac: Hmac<Sha256>,
    revoked: HashSet<String>,
}

impl std::fmt::Debug for DeviceSecrets {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSecrets")
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl DeviceSecrets {
    pub fn new(
        key: &[u8],
        revoked: impl IntoIterator<Item = String>,
    ) -> Result<DeviceSecrets, KeyTooShort> {
        if key.len() < MIN_KEY_BYTES {
            return Err(KeyTooShort(key.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| KeyTooShort(key.len()))?;
        Ok(DeviceSecrets {
            mac,
            revoked: revoked.into_iter().collect(),
        })
    }

    /// The device ids of a deny-list setting: separated by commas or white space.
    pub fn parse_revoked(list: &str) -> Vec<String> {
        list.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn mac_of(&self, device_id: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(LABEL);
        mac.update(device_id.as_bytes());
        mac
    }

    /// The secret of a device, as the operator hands it out.
    pub fn issue(&self, device_id: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.mac_of(device_id).finalize().into_bytes())
    }

    /// Checks a presented secret in constant time.
    pub fn check(&self, device_id: &str, presented: Option<&str>) -> SecretCheck {
        let Some(presented) = presented else {
            return SecretCheck::Missing;
        };
        let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(presented.trim())
        else {
            return SecretCheck::Wrong;
        };
        if self.mac_of(device_id).verify_slice(&bytes).is_err() {
            return SecretCheck::Wrong;
        }
        if self.revoked.contains(device_id) {
            SecretCheck::Revoked
        } else {
            SecretCheck::Valid
        }
    }

    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn an_issued_secret_is_valid_for_its_device_only() {
        let secrets = DeviceSecrets::new(KEY, []).unwrap();
        let secret = secrets.issue("veh-1");
        assert_eq!(secret.len(), 43);
        assert_eq!(secrets.check("veh-1", Some(&secret)), SecretCheck::Valid);
        assert_eq!(secrets.check("veh-2", Some(&secret)), SecretCheck::Wrong);
        assert_eq!(secrets.check("veh-1", None), SecretCheck::Missing);
        assert_eq!(
            secrets.check("veh-1", Some("not base64!")),
            SecretCheck::Wrong
        );
        assert_eq!(
            secrets.check("veh-1", Some(&secret[..42])),
            SecretCheck::Wrong
        );
        // Another key gives other secrets.
        let other = DeviceSecrets::new(b"another key of thirty-two bytes!", []).unwrap();
        assert_eq!(other.check("veh-1", Some(&secret)), SecretCheck::Wrong);
    }

    #[test]
    fn a_revoked_device_is_told_apart_from_a_wrong_secret() {
        let secrets =
            DeviceSecrets::new(KEY, DeviceSecrets::parse_revoked("veh-9, veh-7\nveh-8")).unwrap();
        assert_eq!(secrets.revoked_count(), 3);
        let secret = secrets.issue("veh-7");
        assert_eq!(secrets.check("veh-7", Some(&secret)), SecretCheck::Revoked);
        // A guess at a revoked device's secret learns nothing more than at any other's.
        assert_eq!(secrets.check("veh-7", Some("AAAA")), SecretCheck::Wrong);
    }

    #[test]
    fn a_short_key_is_refused_with_its_length() {
        let error = DeviceSecrets::new(b"short", []).unwrap_err();
        assert_eq!(error, KeyTooShort(5));
        assert!(error.to_string().contains("at least 32"), "{error}");
    }
}
