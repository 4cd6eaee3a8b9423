//! Who is calling, and what they may do: read from the claims and scopes API Gateway's JWT
//! authorizer puts into the event (`requestContext.authorizer.jwt`), after it has checked the
//! token's signature, issuer, audience and expiry. The handlers check the scopes again, so a
//! route added without `authorization_scopes` in Terraform is still closed.
//!
//! - A **device token** carries `telemetry:write`; its device is named by a claim (`sub` by
//!   default, `DEVICE_CLAIM`): it may post that vehicle's readings and no other's.
//! - A **gateway token** carries `telemetry:write:any`: a depot gateway or a telematics
//!   provider forwarding for many vehicles may post readings of any of them.
//! - An **operator token** carries `fleet:read` (vehicles, radius queries, tracks, alerts,
//!   geofences, fleet events), `alerts:ack` (acknowledging, recorded under the token's
//!   subject) and/or `geofences:write` (writing and deleting geofences).
//!
//! Scope names are settings (`SCOPE_*`): Cognito resource-server scopes look like
//! `geostream/telemetry.write`. A deployment with an authorizer sets `AUTHORIZATION=jwt`, and
//! then a request without verified claims is refused (401); the local runner without token
//! verification runs open, as every caller allowed everything.

use std::collections::BTreeSet;

use aws_lambda_events::event::apigw::ApiGatewayV2httpRequest;

/// The scope names the routes need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeNames {
    pub telemetry_write: String,
    pub telemetry_write_any: String,
    pub fleet_read: String,
    pub alerts_ack: String,
    /// Writing and deleting geofences.
    pub geofences_write: String,
}

impl Default for ScopeNames {
    fn default() -> Self {
        ScopeNames {
            telemetry_write: "telemetry:write".into(),
            telemetry_write_any: "telemetry:write:any".into(),
            fleet_read: "fleet:read".into(),
            alerts_ack: "alerts:ack".into(),
            geofences_write: "geofences:write".into(),
        }
    }
}

/// How a deployment decides who may do what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Whether every request must carry a verified token's claims.
    pub require_token: bool,
    /// The claim that names a device token's vehicle.
    pub device_claim: String,
    pub scopes: ScopeNames,
}

impl AccessPolicy {
    /// No token needed, everything allowed: the local runner without token verification.
    pub fn open() -> Self {
        AccessPolicy {
            require_token: false,
            device_claim: "sub".into(),
            scopes: ScopeNames::default(),
        }
    }

    /// Tokens required, default claim and scope names.
    pub fn jwt() -> Self {
        AccessPolicy {
            require_token: true,
            ..AccessPolicy::open()
        }
    }
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No token, on an open deployment.
    Anyone,
    Token(Token),
}

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub subject: String,
    /// The vehicle the device claim names, if the token has the claim.
    pub device: Option<String>,
    pub scopes: BTreeSet<String>,
}

/// A refused request: 401 (no verified token) or 403 (not allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// Whom a request may post readings for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poster {
    AnyVehicle,
    Vehicle(String),
}

impl AccessPolicy {
    /// The caller, from the authorizer's claims in the event.
    pub fn caller(&self, request: &ApiGatewayV2httpRequest) -> Result<Caller, Refusal> {
        let jwt = request
            .request_context
            .authorizer
            .as_ref()
            .and_then(|a| a.jwt.as_ref());
        let Some(jwt) = jwt else {
            return if self.require_token {
                Err(Refusal {
                    status: 401,
                    message: "no verified token: send Authorization: Bearer TOKEN".into(),
                })
            } else {
                Ok(Caller::Anyone)
            };
        };
        let claim = |name: &str| jwt.claims.get(name).filter(|v| !v.is_empty()).cloned();
        // API Gateway lists the scopes it matched; the claims carry them all (`scope`, or
        // `scp` with some providers), space-separated.
        let mut scopes: BTreeSet<String> = jwt.scopes.iter().flatten().cloned().collect();
        for name in ["scope", "scp"] {
            if let Some(text) = claim(name) {
                scopes.extend(
                    text.trim_matches(|c| c == '[' || c == ']')
                        .split([' ', ','])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
        }
        Ok(Caller::Token(Token {
            subject: claim("sub").unwrap_or_else(|| "unknown-subject".into()),
            device: claim(&self.device_claim),
            scopes,
        }))
    }

    /// Refuses a token without `scope` (what `route` needs); an open caller passes.
    /// (`route` is only formatted for a refusal.)
    pub fn require(
        &self,
        caller: &Caller,
        scope: &str,
        route: &dyn std::fmt::Display,
    ) -> Result<(), Refusal> {
        match caller {
            Caller::Anyone => Ok(()),
            Caller::Token(token) if token.scopes.contains(scope) => Ok(()),
            Caller::Token(token) => Err(Refusal {
                status: 403,
                message: format!(
                    "{route} needs the scope {scope:?}; this token (subject {:?}) has {:?}",
                    token.subject, token.scopes
                ),
            }),
        }
    }

    /// Whom the caller may post readings for: any vehicle for an open caller or a gateway
    /// token, else the vehicle the device claim names.
    pub fn poster(&self, caller: &Caller) -> Result<Poster, Refusal> {
        let route = "POST /v1/telemetry";
        let token = match caller {
            Caller::Anyone => return Ok(Poster::AnyVehicle),
            Caller::Token(token) => token,
        };
        if token.scopes.contains(&self.scopes.telemetry_write_any) {
            return Ok(Poster::AnyVehicle);
        }
        self.require(caller, &self.scopes.telemetry_write, &route)?;
        match &token.device {
            Some(device) => Ok(Poster::Vehicle(device.clone())),
            None => Err(Refusal {
                status: 403,
                message: format!(
                    "this token has no {:?} claim naming its vehicle, so it may post for none",
                    self.device_claim
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(claims: &[(&str, &str)], scopes: Option<&[&str]>) -> ApiGatewayV2httpRequest {
        let mut event: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/apigw-jwt.json")).unwrap();
        let jwt = &mut event["requestContext"]["authorizer"]["jwt"];
        jwt["claims"] = claims
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        jwt["scopes"] = scopes.map_or(serde_json::Value::Null, |s| s.into());
        serde_json::from_value(event).unwrap()
    }

    #[test]
    fn a_real_authorizer_event_gives_the_subject_device_and_scopes() {
        let event: ApiGatewayV2httpRequest =
            serde_json::from_str(include_str!("../tests/fixtures/apigw-jwt.json")).unwrap();
        let caller = AccessPolicy::jwt().caller(&event).unwrap();
        let Caller::Token(token) = caller else {
            panic!("{caller:?}")
        };
        assert_eq!(token.subject, "truck-7");
        assert_eq!(token.device.as_deref(), Some("truck-7"));
        assert!(
            token.scopes.contains("telemetry:write"),
            "{:?}",
            token.scopes
        );
    }

    #[test]
    fn no_claims_are_401_where_tokens_are_required_and_anyone_where_not() {
        let mut event = request(&[], None);
        event.request_context.authorizer = None;
        assert_eq!(AccessPolicy::jwt().caller(&event).unwrap_err().status, 401);
        assert_eq!(AccessPolicy::open().caller(&event), Ok(Caller::Anyone));
    }

    #[test]
    fn scopes_come_from_the_list_or_the_scope_claim() {
        let policy = AccessPolicy::jwt();
        let caller = policy
            .caller(&request(
                &[("sub", "ops-1"), ("scope", "fleet:read alerts:ack")],
                None,
            ))
            .unwrap();
        assert!(policy
            .require(&caller, "fleet:read", &"GET /v1/alerts")
            .is_ok());
        assert!(policy.require(&caller, "alerts:ack", &"POST ack").is_ok());
        let refused = policy
            .require(&caller, "telemetry:write", &"POST /v1/telemetry")
            .unwrap_err();
        assert_eq!(refused.status, 403);
        assert!(
            refused.message.contains("telemetry:write"),
            "{}",
            refused.message
        );
        assert_eq!(
            policy.poster(&caller).unwrap_err().status,
            403,
            "an operator token posts nothing"
        );
    }

    #[test]
    fn a_device_posts_for_itself_a_gateway_for_any() {
        let policy = AccessPolicy {
            device_claim: "vehicle_id".into(),
            ..AccessPolicy::jwt()
        };
        let device = policy
            .caller(&request(
                &[("sub", "client-9"), ("vehicle_id", "truck-9")],
                Some(&["telemetry:write"]),
            ))
            .unwrap();
        assert_eq!(
            policy.poster(&device),
            Ok(Poster::Vehicle("truck-9".into()))
        );
        let nameless = policy
            .caller(&request(&[("sub", "client-9")], Some(&["telemetry:write"])))
            .unwrap();
        assert!(policy
            .poster(&nameless)
            .unwrap_err()
            .message
            .contains("vehicle_id"));
        let gateway = policy
            .caller(&request(
                &[("sub", "depot-1")],
                Some(&["telemetry:write:any"]),
            ))
            .unwrap();
        assert_eq!(policy.poster(&gateway), Ok(Poster::AnyVehicle));
    }
}
