//! Inbound authorization decisions: the one matcher the sidecar enforces
//! and the control plane explains, so the two cannot disagree.
//!
//! For a workload with AuthorizationPolicies, a request passes only if
//! some ALLOW rule matches it and no DENY rule does (DENY wins). A
//! workload with none gets the Mesh's `defaultAction` (`deny` unless set to
//! `allow` for a migration). A rule matches when every list it sets
//! matches; a list left out matches anything.

use std::fmt;
use std::sync::Arc;

use crate::model::{
    AuthorizationPolicy, AuthzAction, AuthzRule, DefaultAction, MeshConfig, ResourceRef,
    StringMatch,
};

/// What a decision is about.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The caller's verified SPIFFE ID; `None` without mTLS.
    pub principal: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    /// The inbound port the request arrived on.
    pub port: u16,
}

/// A rule, named for logs and `outrigger authz check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// Shared, so a decision naming it costs no allocation per request.
    pub policy: Arc<str>,
    /// Index in the policy's `rules`.
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AuthorizationPolicy {} rules[{}]",
            self.policy, self.rule
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this ALLOW rule.
    Allow(RuleRef),
    /// No policy selects the workload and the mesh default is `allow`.
    AllowByDefault,
    /// Denied by this DENY rule.
    Deny(RuleRef),
    /// Policies exist, none of their ALLOW rules matches.
    NoMatchingAllow,
    /// No policy selects the workload and the mesh default is `deny`.
    DenyByDefault,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_) | Decision::AllowByDefault)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow(rule) => write!(f, "allowed by {rule}"),
            Decision::AllowByDefault => {
                f.write_str("allowed: no policy selects the workload and the mesh default is allow")
            }
            Decision::Deny(rule) => write!(f, "denied by {rule}"),
            Decision::NoMatchingAllow => f.write_str("denied: no matching ALLOW rule"),
            Decision::DenyByDefault => {
                f.write_str("denied: no policy selects the workload and the mesh default is deny")
            }
        }
    }
}

/// One workload's policies, compiled once per configuration.
#[derive(Debug, Clone)]
pub struct Authorizer {
    deny: Vec<(RuleRef, AuthzRule)>,
    allow: Vec<(RuleRef, AuthzRule)>,
    /// Used when no policy selects the workload.
    default: Option<DefaultAction>,
}

impl Authorizer {
    pub fn for_workload(config: &MeshConfig, workload: &ResourceRef) -> Self {
        let policies: Vec<&AuthorizationPolicy> =
            config.authorization_policies_for(workload).collect();
        let mut deny = Vec::new();
        let mut allow = Vec::new();
        for policy in &policies {
            let name: Arc<str> = Arc::from(policy.id.to_string());
            for (i, rule) in policy.rules.iter().enumerate() {
                let named = RuleRef {
                    policy: name.clone(),
                    rule: i,
                };
                match policy.action {
                    AuthzAction::Deny => deny.push((named, rule.clone())),
                    AuthzAction::Allow => allow.push((named, rule.clone())),
                }
            }
        }
        Self {
            deny,
            allow,
            default: policies
                .is_empty()
                .then_some(config.mesh.default_authorization),
        }
    }

    pub fn decide(&self, request: &AuthzRequest<'_>) -> Decision {
        match self.default {
            Some(DefaultAction::Allow) => return Decision::AllowByDefault,
            Some(DefaultAction::Deny) => return Decision::DenyByDefault,
            None => {}
        }
        let namespace = request.principal.and_then(spiffe_namespace);
        if let Some((rule, _)) = self
            .deny
            .iter()
            .find(|(_, r)| rule_matches(r, request, namespace))
        {
            return Decision::Deny(rule.clone());
        }
        match self
            .allow
            .iter()
            .find(|(_, r)| rule_matches(r, request, namespace))
        {
            Some((rule, _)) => Decision::Allow(rule.clone()),
            None => Decision::NoMatchingAllow,
        }
    }

    /// How many rules it holds.
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn rule_matches(rule: &AuthzRule, request: &AuthzRequest<'_>, namespace: Option<&str>) -> bool {
    let any = |list: &[StringMatch], value: Option<&str>| {
        list.is_empty() || value.is_some_and(|v| list.iter().any(|m| matches(m, v)))
    };
    any(&rule.principals, request.principal)
        && (rule.namespaces.is_empty()
            || namespace.is_some_and(|ns| rule.namespaces.iter().any(|n| n == ns)))
        && (rule.methods.is_empty() || rule.methods.iter().any(|m| m == request.method))
        && any(&rule.paths, Some(request.path))
        && (rule.ports.is_empty() || rule.ports.contains(&request.port))
}

fn matches(m: &StringMatch, value: &str) -> bool {
    match m {
        // `*` alone: any principal at all (still a verified one).
        StringMatch::Prefix(p) if p.is_empty() => true,
        other => other.matches(value),
    }
}

/// `spiffe://<td>/ns/<namespace>/sa/<sa>` → `<namespace>`.
fn spiffe_namespace(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segments = path.split('/');
    match (segments.next(), segments.next()) {
        (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const PAY: &str = "spiffe://cluster.local/ns/payments/sa/api";

    fn authorizer(policies: &str, default: &str) -> Authorizer {
        let yaml = format!(
            "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {{name: mesh}}\nspec: {{authorization: {{defaultAction: {default}}}}}\n---\n\
             apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {{name: api, namespace: shop}}\nspec: {{inbound: [{{port: 8080, appPort: 1}}]}}\n{policies}"
        );
        let config = crate::load_str("test", &yaml).unwrap();
        Authorizer::for_workload(&config, &ResourceRef::new("shop", "api"))
    }

    fn policy(name: &str, action: &str, rules: &str) -> String {
        format!(
            "---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{workload: api, action: {action}, rules: {rules}}}\n"
        )
    }

    fn decide(a: &Authorizer, principal: Option<&str>, method: &str, path: &str) -> Decision {
        a.decide(&AuthzRequest {
            principal,
            method,
            path,
            port: 8080,
        })
    }

    #[test]
    fn without_policies_the_mesh_default_decides() {
        let deny = authorizer("", "deny");
        assert_eq!(
            decide(&deny, Some(WEB), "GET", "/"),
            Decision::DenyByDefault
        );
        let allow = authorizer("", "allow");
        assert_eq!(
            decide(&allow, Some(WEB), "GET", "/"),
            Decision::AllowByDefault
        );
    }

    #[test]
    fn allow_rules_match_on_every_list_they_set() {
        let a = authorizer(
            &policy(
                "web-reads",
                "ALLOW",
                &format!(
                    "[{{from: {{principals: ['{WEB}']}}, to: {{methods: [GET], paths: ['/orders/*', '/health'], ports: [8080]}}}}]"
                ),
            ),
            "deny",
        );
        assert!(decide(&a, Some(WEB), "GET", "/orders/7").allowed());
        assert!(decide(&a, Some(WEB), "GET", "/health").allowed());
        assert_eq!(
            decide(&a, Some(WEB), "GET", "/healthz"),
            Decision::NoMatchingAllow
        );
        assert_eq!(
            decide(&a, Some(WEB), "POST", "/orders/7"),
            Decision::NoMatchingAllow
        );
        assert_eq!(
            decide(&a, Some(PAY), "GET", "/orders/7"),
            Decision::NoMatchingAllow
        );
        assert_eq!(
            decide(&a, None, "GET", "/orders/7"),
            Decision::NoMatchingAllow
        );
        let other_port = a.decide(&AuthzRequest {
            principal: Some(WEB),
            method: "GET",
            path: "/health",
            port: 9090,
        });
        assert_eq!(other_port, Decision::NoMatchingAllow);
        assert_eq!(
            decide(&a, Some(WEB), "GET", "/health"),
            Decision::Allow(RuleRef {
                policy: "shop/web-reads".into(),
                rule: 0
            })
        );
    }

    #[test]
    fn prefixes_and_namespaces() {
        let a = authorizer(
            &policy(
                "payments",
                "ALLOW",
                "[{from: {principals: ['spiffe://cluster.local/ns/payments/*']}}, {from: {namespaces: [shop]}, to: {methods: [GET]}}]",
            ),
            "deny",
        );
        assert!(decide(&a, Some(PAY), "DELETE", "/x").allowed());
        assert!(
            decide(&a, Some(WEB), "GET", "/x").allowed(),
            "namespace shop, GET"
        );
        assert!(!decide(&a, Some(WEB), "PUT", "/x").allowed());
        assert!(
            !decide(&a, None, "GET", "/x").allowed(),
            "no identity, no namespace"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let a = authorizer(
            &format!(
                "{}{}",
                policy("everyone", "ALLOW", "[{from: {principals: ['*']}}]"),
                policy(
                    "no-admin",
                    "DENY",
                    &format!("[{{from: {{principals: ['{WEB}']}}, to: {{paths: ['/admin/*']}}}}]")
                )
            ),
            "deny",
        );
        assert!(decide(&a, Some(WEB), "GET", "/orders").allowed());
        assert!(decide(&a, Some(PAY), "GET", "/admin/users").allowed());
        assert_eq!(
            decide(&a, Some(WEB), "GET", "/admin/users"),
            Decision::Deny(RuleRef {
                policy: "shop/no-admin".into(),
                rule: 0
            })
        );
        // `*` needs a verified caller.
        assert!(!decide(&a, None, "GET", "/orders").allowed());
        // Only DENY policies: nothing is allowed (default deny stands).
        let only_deny = authorizer(
            &policy("no-admin", "DENY", "[{to: {paths: ['/admin/*']}}]"),
            "allow",
        );
        assert_eq!(
            decide(&only_deny, Some(WEB), "GET", "/orders"),
            Decision::NoMatchingAllow
        );
    }
}
