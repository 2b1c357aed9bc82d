//! Authorization matcher: the per-request cost of `Authorizer::decide`
//! with 1, 100 and 10,000 ALLOW rules (issue 6).
//!
//! `cargo bench --bench authz [-- quick]`
//!
//! One Workload `shop/api`; its AuthorizationPolicies hold N ALLOW rules in
//! total (at most 100 per policy), each with one exact principal
//! (`spiffe://cluster.local/ns/shop/sa/web<i>`), one method (`GET`) and one
//! path prefix (`/r<i>/*`). Three requests are timed against each size:
//!
//! - **first**: matches the first rule the matcher tries;
//! - **last**: matches only the last rule;
//! - **none**: a caller no rule names, so it is denied after every rule
//!   has been tried (each rule fails at its principal, the first list
//!   checked).
//!
//! Each figure is the median over several rounds of a bounded loop of
//! `decide` calls (`std::hint::black_box` on input and output), in ns per
//! decision, with its ratio to the 1-rule size in the same run. The
//! matcher runs in this process only: no sockets, no proxy.

use std::hint::black_box;
use std::time::{Duration, Instant};

use outrigger_config::ResourceRef;
use outrigger_config::authz::{Authorizer, AuthzRequest, Decision, RuleRef};

const SIZES: [usize; 3] = [1, 100, 10_000];
const RULES_PER_POLICY: usize = 100;
/// Time one measured batch aims at.
const BATCH_TARGET: Duration = Duration::from_millis(50);
/// Hard bounds on one batch's iterations.
const MIN_ITERS: u64 = 100;
const MAX_ITERS: u64 = 20_000_000;

fn principal(i: usize) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/web{i}")
}

fn config_yaml(rules: usize) -> String {
    let mut out = String::from(
        "apiVersion: outrigger.io/v1alpha1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {authorization: {defaultAction: deny}}\n---\n\
         apiVersion: outrigger.io/v1alpha1\nkind: Workload\nmetadata: {name: api, namespace: shop}\nspec: {inbound: [{port: 8080, appPort: 1}]}\n",
    );
    let policies = rules.div_ceil(RULES_PER_POLICY);
    for p in 0..policies {
        let first = p * RULES_PER_POLICY;
        let last = rules.min(first + RULES_PER_POLICY);
        let list: Vec<String> = (first..last)
            .map(|i| {
                format!(
                    "{{from: {{principals: ['{}']}}, to: {{methods: [GET], paths: ['/r{i}/*']}}}}",
                    principal(i)
                )
            })
            .collect();
        out.push_str(&format!(
            "---\napiVersion: outrigger.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p{p:04}, namespace: shop}}\n\
             spec: {{workload: api, action: ALLOW, rules: [{}]}}\n",
            list.join(", ")
        ));
    }
    out
}

fn authorizer(rules: usize) -> Authorizer {
    let config = outrigger_config::load_str("authz-bench", &config_yaml(rules))
        .unwrap_or_else(|e| panic!("bench config with {rules} rules: {e}"));
    let authorizer = Authorizer::for_workload(&config, &ResourceRef::new("shop", "api"));
    assert_eq!(authorizer.len(), rules, "rules compiled");
    authorizer
}

/// The rule that rule number `i` (0-based, in file order) is.
fn rule_ref(i: usize) -> RuleRef {
    RuleRef {
        policy: format!("shop/p{:04}", i / RULES_PER_POLICY).into(),
        rule: i % RULES_PER_POLICY,
    }
}

#[derive(Clone, Copy)]
enum Case {
    First,
    Last,
    None,
}

impl Case {
    const ALL: [Case; 3] = [Case::First, Case::Last, Case::None];

    fn name(self) -> &'static str {
        match self {
            Case::First => "first rule matches",
            Case::Last => "last rule matches",
            Case::None => "no rule matches (denied)",
        }
    }
}

struct Request {
    principal: String,
    path: String,
    expect: Decision,
}

fn request(case: Case, rules: usize) -> Request {
    let (i, expect) = match case {
        Case::First => (0, Decision::Allow(rule_ref(0))),
        Case::Last => (rules - 1, Decision::Allow(rule_ref(rules - 1))),
        Case::None => (usize::MAX, Decision::NoMatchingAllow),
    };
    if i == usize::MAX {
        return Request {
            principal: "spiffe://cluster.local/ns/other/sa/stranger".into(),
            path: "/r0/items/7".into(),
            expect,
        };
    }
    Request {
        principal: principal(i),
        path: format!("/r{i}/items/7"),
        expect,
    }
}

/// ns per decision over one bounded batch of `iters` calls.
fn batch(authorizer: &Authorizer, req: &AuthzRequest<'_>, iters: u64) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(authorizer.decide(black_box(req)));
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// Iterations for one batch of about `BATCH_TARGET`, within the bounds.
fn calibrate(authorizer: &Authorizer, req: &AuthzRequest<'_>) -> u64 {
    let probe = 1_000;
    let ns = batch(authorizer, req, probe).max(0.1);
    ((BATCH_TARGET.as_nanos() as f64 / ns) as u64).clamp(MIN_ITERS, MAX_ITERS)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let rounds = if quick { 3 } else { 9 };

    let started = Instant::now();
    let authorizers: Vec<(usize, Authorizer)> = SIZES.iter().map(|&n| (n, authorizer(n))).collect();
    eprintln!(
        "authz bench: built {} authorizers in {:.1?}; {rounds} rounds",
        authorizers.len(),
        started.elapsed()
    );

    // [size][case] → (requests, iterations, samples)
    let mut cells = Vec::new();
    for (n, a) in &authorizers {
        let mut row = Vec::new();
        for case in Case::ALL {
            let r = request(case, *n);
            let req = AuthzRequest {
                principal: Some(&r.principal),
                method: "GET",
                path: &r.path,
                port: 8080,
            };
            assert_eq!(a.decide(&req), r.expect, "{n} rules, {}", case.name());
            let iters = calibrate(a, &req);
            row.push((r, iters, Vec::with_capacity(rounds)));
        }
        cells.push(row);
    }

    // Rounds interleave every size and case, so drift hits them alike.
    for _ in 0..rounds {
        for ((_, a), row) in authorizers.iter().zip(cells.iter_mut()) {
            for (r, iters, samples) in row.iter_mut() {
                let req = AuthzRequest {
                    principal: Some(&r.principal),
                    method: "GET",
                    path: &r.path,
                    port: 8080,
                };
                samples.push(batch(a, &req, *iters));
            }
        }
    }

    let medians: Vec<Vec<f64>> = cells
        .iter()
        .map(|row| row.iter().map(|(_, _, s)| median(s.clone())).collect())
        .collect();

    println!("| rules | case | ns/decision | vs 1 rule |");
    println!("|---:|---|---:|---:|");
    for (ci, case) in Case::ALL.iter().enumerate() {
        for (si, (n, _)) in authorizers.iter().enumerate() {
            let ns = medians[si][ci];
            let ratio = ns / medians[0][ci];
            println!("| {n} | {} | {ns:.1} | {ratio:.2}× |", case.name());
        }
    }
    eprintln!(
        "authz bench: {rounds} rounds, median of batches of ~{} ms each, total {:.1?}",
        BATCH_TARGET.as_millis(),
        started.elapsed()
    );
}
