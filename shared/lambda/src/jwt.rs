//! Bearer tokens verified as API Gateway's JWT authorizer verifies them, for where there is no
//! API Gateway in front: the local runner (`geostream-local --jwks`) and ingest behind a Lambda
//! Function URL. A token passes when
//!
//! - it is a JWS signed with RS256 by the key its header's `kid` names in the JWKS,
//! - `iss` is the configured issuer,
//! - `aud` names one of the configured audiences, or, for a token without `aud` (a Cognito
//!   access token), `client_id` does,
//! - `exp` is after now, `nbf` (when present) and `iat` (when present) are not after now, each
//!   with [`CLOCK_SKEW_SECONDS`] of leeway.
//!
//! A token that passes has its claims put into the event where the authorizer puts them
//! (`requestContext.authorizer.jwt`), strings as API Gateway gives them, so the handlers decide
//! with the same code ([`crate::identity`]) whoever verified the token.
//!
//! Keys: the JWKS is read once and kept. A token naming a `kid` the set does not hold makes it
//! read again (a key rotated in), at most once per [`REFETCH_INTERVAL`] so that tokens with
//! made-up `kid`s cannot turn into a flood of fetches; the set is also read again after
//! [`MAX_KEY_AGE`] (a key rotated out stops verifying). When a read fails, the keys already held
//! stay in use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_lambda_events::event::apigw::{
    ApiGatewayRequestAuthorizer, ApiGatewayRequestAuthorizerJwtDescription, ApiGatewayV2httpRequest,
};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

use crate::identity::Refusal;

/// Leeway on `exp`, `nbf` and `iat` for clocks that disagree a little.
pub const CLOCK_SKEW_SECONDS: u64 = 5;
/// The shortest time between two reads of the JWKS caused by an unknown `kid`.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a JWKS is used before it is read again.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(3600);
/// How long one HTTP fetch of the discovery document or the JWKS may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS document on disk (read again on rotation, so editing it rotates keys).
    File(PathBuf),
    /// A JWKS document at a URL.
    Url(String),
    /// The issuer's OpenID Connect discovery document
    /// (`{issuer}/.well-known/openid-configuration`) names the JWKS URL, as API Gateway finds it.
    Discovery,
}

/// Why a token did not pass.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no bearer token: send Authorization: Bearer TOKEN")]
    Missing,
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token is signed with {0:?}; only RS256 is accepted")]
    Algorithm(String),
    #[error("the token's key {0:?} is not in the issuer's key set")]
    UnknownKey(String),
    #[error("the token was refused: {0}")]
    Invalid(String),
    /// The keys could not be read and none are held: not the token's fault.
    #[error("the issuer's signing keys cannot be read: {0}")]
    KeysUnavailable(String),
}

impl TokenError {
    /// The answer for a request with this token: 401, or 503 when the keys cannot be read.
    pub fn refusal(&self) -> Refusal {
        let status = match self {
            TokenError::KeysUnavailable(_) => 503,
            _ => 401,
        };
        Refusal {
            status,
            message: self.to_string(),
        }
    }
}

/// Verifies bearer tokens of one issuer for a set of audiences.
pub struct JwtVerifier {
    issuer: String,
    audiences: Vec<String>,
    keys: KeyCache,
}

impl JwtVerifier {
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>, source: KeySource) -> Self {
        let issuer = issuer.into();
        JwtVerifier {
            keys: KeyCache::new(source, issuer.clone()),
            issuer,
            audiences,
        }
    }

    /// Verifies the request's bearer token and puts its claims into the event where API
    /// Gateway's JWT authorizer puts them; anything the event carried there before is dropped.
    pub async fn authorize(&self, request: &mut ApiGatewayV2httpRequest) -> Result<(), Refusal> {
        request.request_context.authorizer = None;
        let token = bearer_token(request).ok_or_else(|| TokenError::Missing.refusal())?;
        let jwt = self.verify(token).await.map_err(|error| error.refusal())?;
        let mut authorizer = ApiGatewayRequestAuthorizer::default();
        authorizer.jwt = Some(jwt);
        request.request_context.authorizer = Some(authorizer);
        Ok(())
    }

    /// The token's claims, as API Gateway's authorizer gives them, if the token passes.
    pub async fn verify(
        &self,
        token: &str,
    ) -> Result<ApiGatewayRequestAuthorizerJwtDescription, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| TokenError::Malformed(error.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Malformed("its header names no key (kid)".into()))?;
        let key = self.keys.key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = CLOCK_SKEW_SECONDS;
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.validate_nbf = true;
        // Checked below: API Gateway accepts `client_id` in place of `aud`.
        validation.validate_aud = false;
        let claims =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation)
                .map_err(|error| TokenError::Invalid(describe(error.kind(), &self.issuer)))?
                .claims;

        if !self.audience_matches(&claims) {
            return Err(TokenError::Invalid(format!(
                "its audience (aud, or client_id without aud) is not one of {:?}",
                self.audiences
            )));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(iat) = claims.get("iat").and_then(Value::as_u64) {
            if iat > now + CLOCK_SKEW_SECONDS {
                return Err(TokenError::Invalid(
                    "it is issued in the future (iat)".into(),
                ));
            }
        }
        Ok(authorizer_description(claims))
    }

    fn audience_matches(&self, claims: &serde_json::Map<String, Value>) -> bool {
        let named = |value: &Value| match value {
            Value::String(one) => self.audiences.contains(one),
            Value::Array(many) => many
                .iter()
                .filter_map(Value::as_str)
                .any(|one| self.audiences.iter().any(|a| a == one)),
            _ => false,
        };
        match claims.get("aud") {
            Some(aud) => named(aud),
            None => claims.get("client_id").is_some_and(named),
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case).
fn bearer_token(request: &ApiGatewayV2httpRequest) -> Option<&str> {
    let value = request
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn describe(kind: &ErrorKind, issuer: &str) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "it has expired (exp)".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => format!("its issuer (iss) is not {issuer:?}"),
        ErrorKind::InvalidSignature => "its signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        other => format!("{other:?}"),
    }
}

/// Claims as API Gateway hands them to the function: every value a string (arrays as
/// `[a b]`, objects as JSON), and the token's scopes from `scope` (or `scp`).
fn authorizer_description(
    claims: serde_json::Map<String, Value>,
) -> ApiGatewayRequestAuthorizerJwtDescription {
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(|item| item
                    .as_str()
                    .map_or_else(|| item.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        other => other.to_string(),
    };
    let scopes: Vec<String> = ["scope", "scp"]
        .iter()
        .filter_map(|name| claims.get(*name))
        .flat_map(|value| match value {
            Value::String(s) => s.split(' ').map(str::to_string).collect::<Vec<_>>(),
            Value::Array(items) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        })
        .filter(|s| !s.is_empty())
        .collect();
    let mut description = ApiGatewayRequestAuthorizerJwtDescription::default();
    description.claims = claims.iter().map(|(k, v)| (k.clone(), text(v))).collect();
    description.scopes = (!scopes.is_empty()).then_some(scopes);
    description
}

/// The signing keys by `kid`, read when first needed and kept (see the module's doc).
struct KeyCache {
    source: KeySource,
    issuer: String,
    http: reqwest::Client,
    held: RwLock<HeldKeys>,
    /// One read at a time; the others wait for it and use what it read.
    reading: Mutex<()>,
}

#[derive(Default)]
struct HeldKeys {
    by_kid: HashMap<String, DecodingKey>,
    /// When the last read was attempted.
    read_at: Option<Instant>,
    /// When the keys held were read.
    fresh_at: Option<Instant>,
}

impl HeldKeys {
    fn read_allowed(&self, kid_known: bool) -> bool {
        let stale = self
            .fresh_at
            .is_none_or(|fresh| fresh.elapsed() >= MAX_KEY_AGE);
        let retry_due = self
            .read_at
            .is_none_or(|read| read.elapsed() >= REFETCH_INTERVAL);
        retry_due && (stale || !kid_known)
    }
}

impl KeyCache {
    fn new(source: KeySource, issuer: String) -> Self {
        KeyCache {
            source,
            issuer,
            http: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .build()
                .unwrap_or_default(),
            held: RwLock::new(HeldKeys::default()),
            reading: Mutex::new(()),
        }
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        {
            let held = self.held.read().await;
            let known = held.by_kid.get(kid);
            if !held.read_allowed(known.is_some()) {
                return known
                    .cloned()
                    .ok_or_else(|| TokenError::UnknownKey(kid.to_string()));
            }
        }
        let _reading = self.reading.lock().await;
        // Another request may have read the set while this one waited.
        let must_read = {
            let held = self.held.read().await;
            held.read_allowed(held.by_kid.contains_key(kid))
        };
        let read_error = if must_read {
            let read = self.read().await;
            let mut held = self.held.write().await;
            held.read_at = Some(Instant::now());
            match read {
                Ok(by_kid) => {
                    held.by_kid = by_kid;
                    held.fresh_at = held.read_at;
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the JWT signing keys; keeping those held");
                    Some(error)
                }
            }
        } else {
            None
        };
        let held = self.held.read().await;
        match (held.by_kid.get(kid), read_error) {
            (Some(key), _) => Ok(key.clone()),
            (None, Some(error)) if held.by_kid.is_empty() => {
                Err(TokenError::KeysUnavailable(error))
            }
            (None, _) => Err(TokenError::UnknownKey(kid.to_string())),
        }
    }

    /// Reads the key set: the usable RSA signing keys by `kid`.
    async fn read(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let document = match &self.source {
            KeySource::File(path) => std::fs::read_to_string(path)
                .map_err(|error| format!("{}: {error}", path.display()))?,
            KeySource::Url(url) => self.get(url).await?,
            KeySource::Discovery => {
                let discovery_url = format!(
                    "{}/.well-known/openid-configuration",
                    self.issuer.trim_end_matches('/')
                );
                let discovery: Value = serde_json::from_str(&self.get(&discovery_url).await?)
                    .map_err(|error| format!("{discovery_url}: {error}"))?;
                let jwks_url = discovery["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| format!("{discovery_url} names no jwks_uri"))?
                    .to_string();
                self.get(&jwks_url).await?
            }
        };
        let set: JwkSet = serde_json::from_str(&document)
            .map_err(|error| format!("the key set is not a JWKS: {error}"))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    by_kid.insert(kid, key);
                }
                Err(error) => tracing::warn!(%kid, %error, "a JWKS key is not usable; skipped"),
            }
        }
        Ok(by_kid)
    }

    async fn get(&self, url: &str) -> Result<String, String> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| format!("{url}: {error}"))?;
        response
            .text()
            .await
            .map_err(|error| format!("{url}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISSUER: &str = "https://issuer.example";
    const AUDIENCE: &str = "geostream-devices";

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn verifier(jwks: PathBuf) -> JwtVerifier {
        JwtVerifier::new(ISSUER, vec![AUDIENCE.into()], KeySource::File(jwks))
    }

    /// A token signed by `key` (a fixture name), whose header names `kid`.
    fn token(key: &str, kid: &str, claims: Value) -> String {
        let pem = std::fs::read(fixture(&format!("{key}.pem"))).unwrap();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn device_claims() -> Value {
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "truck-7", "exp": now() + 600,
               "iat": now(), "scope": "telemetry:write", "groups": ["a", "b"], "n": 3})
    }

    #[tokio::test]
    async fn a_good_token_gives_its_claims_as_api_gateway_does() {
        let verifier = verifier(fixture("test-key-1.jwks.json"));
        let jwt = verifier
            .verify(&token("test-key-1", "test-key-1", device_claims()))
            .await
            .unwrap();
        assert_eq!(jwt.claims["sub"], "truck-7");
        assert_eq!(jwt.claims["groups"], "[a b]");
        assert_eq!(jwt.claims["n"], "3");
        assert_eq!(jwt.scopes, Some(vec!["telemetry:write".to_string()]));
    }

    #[tokio::test]
    async fn each_defect_is_refused_with_its_reason() {
        let verifier = verifier(fixture("test-key-1.jwks.json"));
        let with = |change: &dyn Fn(&mut Value)| {
            let mut claims = device_claims();
            change(&mut claims);
            token("test-key-1", "test-key-1", claims)
        };
        let cases = [
            (with(&|c| c["exp"] = json!(now() - 60)), "expired"),
            (with(&|c| c["nbf"] = json!(now() + 600)), "not valid yet"),
            (
                with(&|c| c["iat"] = json!(now() + 600)),
                "issued in the future",
            ),
            (
                with(&|c| c["iss"] = json!("https://other.example")),
                "issuer",
            ),
            (with(&|c| c["aud"] = json!("someone-else")), "audience"),
            (
                with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))),
                "no exp claim",
            ),
            (
                token("test-key-1", "no-such-key", device_claims()),
                "not in the issuer's key set",
            ),
            // Signed by another key than the one its kid names.
            (
                token("test-key-2", "test-key-1", device_claims()),
                "signature does not verify",
            ),
            ("not.a.token".to_string(), "not a JWT"),
        ];
        for (token, reason) in cases {
            let error = verifier.verify(&token).await.unwrap_err();
            assert_eq!(error.refusal().status, 401);
            assert!(
                error.to_string().contains(reason),
                "{error} (wanted {reason})"
            );
        }
        let hs256 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &device_claims(),
            &EncodingKey::from_secret(b"guessable"),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&hs256).await.unwrap_err(),
            TokenError::Algorithm("HS256".into())
        );
    }

    #[tokio::test]
    async fn a_token_without_aud_passes_by_its_client_id_as_cognito_access_tokens_do() {
        let verifier = verifier(fixture("test-key-1.jwks.json"));
        let mut claims = device_claims();
        claims.as_object_mut().unwrap().remove("aud");
        claims["client_id"] = json!(AUDIENCE);
        assert!(verifier
            .verify(&token("test-key-1", "test-key-1", claims.clone()))
            .await
            .is_ok());
        claims["client_id"] = json!("another-app");
        assert!(verifier
            .verify(&token("test-key-1", "test-key-1", claims))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn authorize_fills_the_event_and_refuses_a_request_without_a_token() {
        let verifier = verifier(fixture("test-key-1.jwks.json"));
        let mut request = ApiGatewayV2httpRequest::default();
        let refusal = verifier.authorize(&mut request).await.unwrap_err();
        assert_eq!(
            (refusal.status, refusal.message.contains("Bearer")),
            (401, true)
        );

        let bearer = format!(
            "bearer {}",
            token("test-key-1", "test-key-1", device_claims())
        );
        request
            .headers
            .insert(http::header::AUTHORIZATION, bearer.parse().unwrap());
        verifier.authorize(&mut request).await.unwrap();
        let jwt = request.request_context.authorizer.unwrap().jwt.unwrap();
        assert_eq!(jwt.claims["sub"], "truck-7");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_rotated_in_is_read_again_at_most_once_per_interval() {
        let jwks = std::env::temp_dir().join(format!("geostream-jwks-{}.json", std::process::id()));
        let only_first = std::fs::read_to_string(fixture("test-key-1.jwks.json")).unwrap();
        std::fs::write(&jwks, &only_first).unwrap();
        let verifier = verifier(jwks.clone());
        let first = token("test-key-1", "test-key-1", device_claims());
        let second = token("test-key-2", "test-key-2", device_claims());
        assert!(verifier.verify(&first).await.is_ok());
        assert_eq!(
            verifier.verify(&second).await.unwrap_err(),
            TokenError::UnknownKey("test-key-2".into())
        );

        // The issuer publishes the second key beside the first.
        let second_key: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("test-key-2.jwks.json")).unwrap(),
        )
        .unwrap();
        let mut both: Value = serde_json::from_str(&only_first).unwrap();
        both["keys"]
            .as_array_mut()
            .unwrap()
            .push(second_key["keys"][0].clone());
        std::fs::write(&jwks, both.to_string()).unwrap();
        // Read again only once the interval since the last read has passed.
        assert!(verifier.verify(&second).await.is_err());
        tokio::time::advance(REFETCH_INTERVAL).await;
        assert!(verifier.verify(&second).await.is_ok());
        assert!(verifier.verify(&first).await.is_ok());

        // The first key is retired: after the key set's age it no longer verifies.
        std::fs::write(&jwks, second_key.to_string()).unwrap();
        tokio::time::advance(MAX_KEY_AGE).await;
        assert_eq!(
            verifier.verify(&first).await.unwrap_err(),
            TokenError::UnknownKey("test-key-1".into())
        );
        assert!(verifier.verify(&second).await.is_ok());
        std::fs::remove_file(&jwks).unwrap();
    }

    #[tokio::test]
    async fn keys_that_cannot_be_read_are_a_503_not_the_tokens_fault() {
        let verifier = verifier(fixture("no-such-file.json"));
        let error = verifier
            .verify(&token("test-key-1", "test-key-1", device_claims()))
            .await
            .unwrap_err();
        assert_eq!(error.refusal().status, 503, "{error}");
    }
}
