//! The plan of a request: which of its targets can serve it, in chain order, with their tries
//! and timeouts, and how much of its body the parse must keep for them.

use std::time::Duration;

use crate::config::{CacheSettings, Config, Step};
use crate::policy::chain::{Availability, Hop};
use crate::request::body::{Body, Keep};
use crate::target::provider::{self, Unservable};
use crate::target::rewrite::{self, Operation};

/// A target left out of a request's chain, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip<'a> {
    pub target: usize,
    pub reason: Unservable,
    /// The model it was asked for.
    pub model: Option<&'a str>,
}

/// The steps of a request: its route's, or every target's, in chain order, without the
/// targets its gateway key may not use (`allowed`).
pub fn steps<'c>(config: &'c Config, route: Option<usize>, allowed: &[usize]) -> Vec<&'c Step> {
    let all = match route.and_then(|r| config.routes.get(r)) {
        Some(route) => &route.steps,
        None => &config.steps,
    };
    all.iter().filter(|s| allowed.contains(&s.target)).collect()
}

/// The hops of an operation's chain: its steps in order without those whose target cannot take
/// it (an Azure target with no deployment for the model, an API without the operation), which
/// are returned apart.
pub fn hops<'a>(
    config: &'a Config,
    steps: &[&'a Step],
    op: Operation,
    client_path: &str,
    body: &'a Body,
) -> (Vec<Hop>, Vec<Skip<'a>>) {
    let mut hops = Vec::with_capacity(steps.len());
    let mut skipped = Vec::new();
    for &step in steps {
        let Some(t) = config.targets.get(step.target) else {
            continue;
        };
        let model = rewrite::model_of(step, body);
        match provider::address(t, Some(op), model, client_path) {
            Ok(_) => hops.push(Hop {
                target: step.target,
                max_tries: step.retries + 1,
                timeout: step.timeout,
            }),
            Err(reason) => skipped.push(Skip {
                target: step.target,
                reason,
                model,
            }),
        }
    }
    (hops, skipped)
}

/// A request continuing a stored response (`previous_response_id`) goes to the target that
/// created it and nowhere else (no other target could find it): the chain is that target's hop
/// when the chain has it. `None` when it has not (the owner cannot serve this request).
pub fn pinned(hops: &[Hop], owner: usize) -> Option<Vec<Hop>> {
    hops.iter()
        .find(|h| h.target == owner)
        .map(|h| vec![h.clone()])
}

/// A request naming a stored response whose owner is not known here goes down its chain until
/// a target has the response: the ready targets first, then the spilled ones, then the cooling
/// ones (they may be the only ones that hold it), each group in chain order.
pub fn probing(mut hops: Vec<Hop>, availability: impl Fn(usize) -> Availability) -> Vec<Hop> {
    hops.sort_by_key(|h| match availability(h.target) {
        Availability::Ready => 0,
        Availability::Avoid => 1,
        Availability::Skip => 2,
    });
    hops
}

/// The probe of a request on a stored response (`/v1/responses/{id}...`) whose owner is not
/// known here: every target it may use, each asked once (a second ask gets the same answer, and
/// a `DELETE` is not repeated), with its timeout.
pub fn resource_probe(config: &Config, targets: &[usize]) -> Vec<Hop> {
    targets
        .iter()
        .filter_map(|&t| config.steps.get(t))
        .map(|step| Hop {
            target: step.target,
            max_tries: 1,
            timeout: step.timeout,
        })
        .collect()
}

/// A pass-through goes once to the first target, bounded by the request's deadline.
pub fn pass_through(config: &Config, targets: &[usize]) -> Option<Hop> {
    targets.first().map(|&target| Hop {
        target,
        max_tries: 1,
        timeout: config.deadline,
    })
}

/// How much of the body the parse must keep: the document when the cache will key the request
/// or a step of its chain may change the body.
pub fn keep(config: &Config, steps: &[&Step], op: Operation, cacheable: bool) -> Keep {
    let rewrites = steps.iter().any(|s| {
        config
            .targets
            .get(s.target)
            .is_some_and(|t| rewrite::may_change_body(t, s, op))
    });
    if cacheable || rewrites {
        Keep::Document
    } else {
        Keep::Typed
    }
}

/// The cache that may answer or store this request (before its body is read: a streamed
/// request is told apart by the body): its route's own, or the top-level one off routes.
pub fn cache(
    config: &Config,
    route: Option<usize>,
    op: Operation,
    no_cache: bool,
) -> Option<&CacheSettings> {
    let settings = match route {
        Some(r) => config.routes.get(r)?.cache.as_ref(),
        None => config.cache.as_ref(),
    };
    settings.filter(|_| op == Operation::ChatCompletions && !no_cache)
}

/// The timeout Envoy's route gets for the routed attempt, in milliseconds (at least 1: 0 would
/// mean "no timeout").
pub fn route_timeout_ms(timeout: Duration) -> u64 {
    crate::duration::millis(timeout).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, NoEnv};
    use serde_json::json;

    fn config(extra: serde_json::Value) -> Config {
        let mut c = json!({"targets": [
            {"name": "openai", "provider": "openai", "cluster": "o", "api_key": "k", "retries": 2, "timeout": "5s"},
            {"name": "azure", "provider": "azure", "cluster": "a", "api_key": "k",
             "resource_name": "r", "api_version": "2024-10-21", "deployments": {"gpt-4o": "prod"}},
            {"name": "mini", "provider": "openai", "cluster": "o", "api_key": "k", "model": "gpt-4o-mini"},
        ]});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        config::parse(c.to_string().as_bytes(), &NoEnv).unwrap()
    }

    fn body(text: &str) -> Body {
        Body::parse(text.as_bytes().to_vec(), Keep::Typed).unwrap()
    }

    #[test]
    fn the_chain_keeps_its_order_and_leaves_out_what_cannot_serve() {
        let c = config(json!({}));
        let b = body(r#"{"model": "gpt-4o"}"#);
        let all = steps(&c, None, &c.chain);
        let (chain, skipped) = hops(
            &c,
            &all,
            Operation::ChatCompletions,
            "/v1/chat/completions",
            &b,
        );
        let plan: Vec<(usize, u32, u64)> = chain
            .iter()
            .map(|h| (h.target, h.max_tries, h.timeout.as_secs()))
            .collect();
        assert_eq!(plan, vec![(0, 3, 5), (1, 1, 60), (2, 1, 60)]);
        assert!(skipped.is_empty());

        let b = body(r#"{"model": "gpt-3.5-turbo"}"#);
        let some = steps(&c, None, &[1, 0]);
        assert_eq!(
            some.iter().map(|s| s.target).collect::<Vec<_>>(),
            vec![0, 1],
            "chain order"
        );
        let (chain, skipped) = hops(&c, &some, Operation::Embeddings, "/v1/embeddings", &b);
        assert_eq!(chain.iter().map(|h| h.target).collect::<Vec<_>>(), vec![0]);
        assert_eq!(
            skipped,
            vec![Skip {
                target: 1,
                reason: Unservable::NoDeployment,
                model: Some("gpt-3.5-turbo")
            }]
        );
    }

    #[test]
    fn a_route_has_its_own_steps_and_cache() {
        let c = config(json!({
            "cache": {"enabled": true},
            "routes": [{"name": "r", "path": "/r", "operation": "chat",
                        "targets": [{"target": "azure", "retries": 3, "timeout": "2s", "model": "gpt-4o"}, "openai"],
                        "cache": {"enabled": true, "ttl": "5s"}},
                       {"name": "plain", "path": "/p", "operation": "chat", "targets": ["mini"]}]
        }));
        let route = steps(&c, Some(0), &c.chain);
        let settings: Vec<(usize, u32, u64, Option<&str>)> = route
            .iter()
            .map(|s| (s.target, s.retries, s.timeout.as_secs(), s.model.as_deref()))
            .collect();
        assert_eq!(settings, vec![(1, 3, 2, Some("gpt-4o")), (0, 2, 5, None)]);
        // A key limited to openai keeps only that step.
        assert_eq!(
            steps(&c, Some(0), &[0])
                .iter()
                .map(|s| s.target)
                .collect::<Vec<_>>(),
            vec![0]
        );
        // The step's model picks the deployment when the client sends none.
        let b = body(r#"{"messages": []}"#);
        let (chain, skipped) = hops(
            &c,
            &route,
            Operation::ChatCompletions,
            "/v1/chat/completions",
            &b,
        );
        assert_eq!(chain.len(), 2);
        assert!(skipped.is_empty());
        let chat = Operation::ChatCompletions;
        assert_eq!(
            cache(&c, Some(0), chat, false).map(|s| (s.scope.as_str(), s.ttl.as_secs())),
            Some(("r", 5))
        );
        assert_eq!(
            cache(&c, Some(1), chat, false),
            None,
            "a route uses its own cache only"
        );
    }

    #[test]
    fn a_continued_response_goes_to_its_owner_only() {
        let hop = |target| Hop {
            target,
            max_tries: 2,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(pinned(&[hop(0), hop(1)], 1), Some(vec![hop(1)]));
        assert_eq!(pinned(&[hop(0)], 1), None);
    }

    #[test]
    fn a_probe_asks_ready_targets_first_and_cooling_ones_last() {
        let states = [
            Availability::Skip,
            Availability::Ready,
            Availability::Avoid,
            Availability::Ready,
        ];
        let hop = |target| Hop {
            target,
            max_tries: 1,
            timeout: Duration::from_secs(1),
        };
        let order: Vec<usize> = probing((0..4).map(hop).collect(), |t| states[t])
            .iter()
            .map(|h| h.target)
            .collect();
        assert_eq!(order, vec![1, 3, 2, 0]);
    }

    #[test]
    fn a_pass_through_is_one_try_on_the_first_target_within_the_deadline() {
        let c = config(json!({"deadline": "7s"}));
        let hop = pass_through(&c, &[2, 0]).unwrap();
        assert_eq!(
            (hop.target, hop.max_tries, hop.timeout.as_secs()),
            (2, 1, 7)
        );
        assert_eq!(pass_through(&c, &[]), None);
    }

    #[test]
    fn the_document_is_kept_only_for_the_cache_or_a_rewrite() {
        let c = config(json!({}));
        let chat = Operation::ChatCompletions;
        let (first_two, with_mini) = (steps(&c, None, &[0, 1]), steps(&c, None, &[0, 2]));
        assert_eq!(keep(&c, &first_two, chat, false), Keep::Typed);
        assert_eq!(keep(&c, &first_two, chat, true), Keep::Document);
        assert_eq!(
            keep(&c, &with_mini, chat, false),
            Keep::Document,
            "mini sets a model"
        );
        assert_eq!(
            keep(&c, &first_two, Operation::Responses, false),
            Keep::Document,
            "Azure's Responses API names the deployment in the body"
        );
        let cached = config(json!({"cache": {"enabled": true}}));
        assert!(cache(&cached, None, chat, false).is_some());
        assert!(cache(&cached, None, chat, true).is_none());
        assert!(cache(&cached, None, Operation::Embeddings, false).is_none());
        assert!(cache(&c, None, chat, false).is_none());
    }

    #[test]
    fn route_timeouts_are_never_zero() {
        assert_eq!(route_timeout_ms(Duration::ZERO), 1);
        assert_eq!(route_timeout_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(route_timeout_ms(Duration::MAX), u64::MAX);
    }
}
