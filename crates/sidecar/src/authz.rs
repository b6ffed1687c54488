//! The seam between MCP and the policy engine: turns an MCP message and its
//! session into a `chaperone_policy` decision request, applies the sidecar's own
//! limits (session max calls, rate limits), records the step, writes the audit
//! record and mints the assertion, and turns the outcome back into what the proxy
//! does (forward, or answer with a JSON-RPC error). `tools/list`-style results are
//! filtered here with the engine's `visible`, the same rules as calls, and with
//! the tools' definition pins where the server enforces them: a listed tool's
//! definition is hashed as the list passes ([`crate::inventory`]), and a call
//! looks its tool's last hash up.
//!
//! Resources and prompts are governed by the same rule model under names of their
//! own: `resources/read` of `file:///x` is decided as tool `resource:file:///x`,
//! `prompts/get` of `greet` as tool `prompt:greet` (deny unless a rule allows).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chaperone_policy::model::{EnforcementMode, ToolPinning};
use chaperone_policy::{
    ApprovalRequirement, CurrentDefinition, Decision, DecisionRequest, Engine, GrantKey,
    PinVerdict, Reason, Verdict, redact,
};
use serde_json::{Value, json};

use crate::approvals::{ApprovalAsk, HeldRefusal};
use crate::assertion::{Actor, AssertionSigner, Claims, HexId, TaskContext};
use crate::audit::{
    AuditAgent, AuditApproval, AuditDefinition, AuditLog, AuditRecord, AuditSession, rfc3339_millis,
};
use crate::canonical::{args_digest, hex};
use crate::inventory::{ListedTool, ToolInventory};
use crate::jsonrpc::{self, Id, Message};
use crate::methods::{self, Era, Handling};
use crate::metrics::{Metrics, PinningLabels, Stage};
use crate::ratelimit::AgentRateLimits;
use crate::refusal::AuditUnavailable;
use crate::session::{Delegation, SessionState, StepDecision};
use crate::snapshot::{ActivePolicy, Upstream};

/// The rule named when a session reached its `maxCalls`.
pub(crate) const SESSION_MAX_CALLS_RULE: &str = "session.maxCalls";

/// The method whose calls tool definition pins apply to.
const TOOLS_CALL: &str = "tools/call";

/// The `reason` label of the pinning metric for a verdict that does not pass.
fn pinning_reason(verdict: &PinVerdict) -> &'static str {
    match verdict {
        PinVerdict::Differs { .. } => "changed",
        PinVerdict::Unpinned { .. } => "unpinned",
        PinVerdict::Conflicting { .. } => "conflicting",
        PinVerdict::Unknown => "unseen",
        PinVerdict::Unchecked | PinVerdict::Matches => "none",
    }
}

/// Prefix of the policy name of a resource.
pub const RESOURCE_PREFIX: &str = "resource:";
/// Prefix of the policy name of a prompt.
pub const PROMPT_PREFIX: &str = "prompt:";
/// What [`args_digest`] writes before the hex digest (`sha256:<hex>`);
/// approval requests carry the bare hex.
const DIGEST_PREFIX: &str = "sha256:";

/// What a message asks for, as the policy sees it.
#[derive(Debug, PartialEq)]
pub enum Governed<'a> {
    /// A call to decide: `tools/call`, `resources/read|subscribe|unsubscribe`,
    /// `prompts/get`.
    Call {
        /// The name the rules match (`tool`, `resource:<uri>`, `prompt:<name>`).
        name: String,
        /// The arguments rules read.
        arguments: Option<&'a Value>,
    },
    /// A call whose params cannot be read: refused without forwarding.
    Malformed(&'static str),
    /// A method the sidecar does not forward: unknown (and not listed in the
    /// AgentIdentity's `passthroughMethods`), or not part of the message's
    /// protocol era. Refused without forwarding.
    NotForwarded(String),
    /// A request about a task (`tasks/get`, …): forwarded only when a call
    /// of the same session created that task.
    Task {
        /// The task it names (`params.taskId`).
        task_id: &'a str,
    },
    /// A list whose result is filtered.
    List,
    /// Passes through (initialize, ping, notifications, responses, …).
    Pass,
}

/// The `params` members the sidecar reads: a member folding to one of them
/// but spelled otherwise would be read as it by case-folding servers (Go's
/// `encoding/json`) and not by the sidecar.
const READ_PARAMS: [&str; 5] = ["name", "arguments", "uri", "_meta", "taskId"];
/// [`READ_PARAMS`] case-folded.
const READ_PARAMS_FOLDED: [&str; 5] = ["name", "arguments", "uri", "_meta", "taskid"];

/// The protocol era a message declares: its
/// `params._meta["io.modelcontextprotocol/protocolVersion"]`, else the
/// request's `MCP-Protocol-Version` header; [`Era::Both`] when neither says.
pub fn message_era(message: &Message, header_version: Option<&str>) -> Era {
    let declared = message
        .params()
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(PROTOCOL_VERSION_META))
        .and_then(Value::as_str)
        .or(header_version);
    declared.map_or(Era::Both, methods::era_of)
}

/// The `_meta` key of a request's protocol version (2026-07-28).
pub const PROTOCOL_VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";

/// Classifies a client-to-server message of protocol era `era`; `passthrough`
/// lists the extra methods the AgentIdentity forwards ungoverned.
pub fn classify<'a>(message: &'a Message, era: Era, passthrough: &[String]) -> Governed<'a> {
    let Some(method) = message.method() else {
        return Governed::Pass;
    };
    let Some(known) = methods::lookup(method) else {
        return if passthrough.iter().any(|m| m == method) {
            Governed::Pass
        } else {
            Governed::NotForwarded(format!(
                "method {method:?} is not an MCP method Chaperone governs or forwards (list it in the AgentIdentity's passthroughMethods to forward it)"
            ))
        };
    };
    if !known.exists_in(era) {
        return Governed::NotForwarded(format!(
            "method {method:?} does not exist in the protocol revision this request declares"
        ));
    }
    if method == "initialize" && !matches!(message, Message::Request { .. }) {
        return Governed::Malformed("initialize must be a request (with an id)");
    }
    let params = message.params();
    if let Some(Value::Object(members)) = params
        && members.keys().any(|key| {
            let folded = chaperone_json::fold_key(key);
            READ_PARAMS_FOLDED.contains(&folded.as_ref()) && !READ_PARAMS.contains(&key.as_str())
        })
    {
        return Governed::Malformed(
            "params has a member spelled like name, arguments, uri, _meta or taskId in another letter case",
        );
    }
    let string = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_str);
    let arguments = params.and_then(|p| p.get("arguments"));
    if let Some(args) = arguments
        && !args.is_object()
    {
        return Governed::Malformed("params.arguments must be an object");
    }
    match known.handling {
        Handling::Pass => Governed::Pass,
        Handling::List => Governed::List,
        Handling::Task => match string("taskId") {
            Some(task_id) if matches!(message, Message::Request { .. }) => {
                Governed::Task { task_id }
            }
            Some(_) => Governed::Malformed("a task method must be a request (with an id)"),
            None => Governed::Malformed("params.taskId must be a string"),
        },
        Handling::Call => match method {
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                match string("uri") {
                    Some(uri) => Governed::Call {
                        name: format!("{RESOURCE_PREFIX}{uri}"),
                        arguments: None,
                    },
                    None => Governed::Malformed("params.uri must be a string"),
                }
            }
            "prompts/get" => match string("name") {
                Some(name) => Governed::Call {
                    name: format!("{PROMPT_PREFIX}{name}"),
                    arguments,
                },
                None => Governed::Malformed("params.name must be a string"),
            },
            _ => match string("name") {
                Some(name) => Governed::Call {
                    name: name.to_owned(),
                    arguments,
                },
                None => Governed::Malformed("params.name must be a string"),
            },
        },
    }
}

/// The outcome of one decided call.
#[derive(Debug)]
pub struct CallOutcome {
    /// Whether the call goes to the tool server.
    pub forward: bool,
    /// The assertion to send with it.
    pub assertion: Option<String>,
    /// The JSON-RPC error to answer with when not forwarded.
    pub error: Option<Value>,
    /// The call needs a person's approval first: nothing is recorded yet
    /// (neither `forward` nor `error` is set).
    pub held: Option<HeldCall>,
}

/// A call held for a person's approval (see [`Enforcer::decide_call`]).
#[derive(Debug)]
pub struct HeldCall {
    /// What to ask the controller.
    pub ask: ApprovalAsk,
    /// The `requireApproval` rule that matched (`policy/rule`).
    pub rule: String,
}

/// The parts of an audit record that vary by decision (see
/// [`Enforcer::write_record`]).
#[derive(Debug)]
pub struct RecordEntry<'a> {
    /// The JSON-RPC method.
    pub method: &'a str,
    /// The policy name of the tool (empty when none).
    pub tool: &'a str,
    /// The tool server (or `inbound:<caller>`).
    pub server: &'a str,
    /// `sha256:<hex>` of the canonical arguments.
    pub args_digest: &'a str,
    /// `allow`, `deny`, `wouldDeny`, `approval` or `wouldRequireApproval`.
    pub decision: &'a str,
    /// The rule, or a fixed reason such as `protocol`.
    pub rule: &'a str,
    /// Why.
    pub reason: &'a str,
    /// The upstream's session id (empty if none).
    pub mcp_session_id: &'a str,
    /// Time the decision took.
    pub latency_us: u64,
    /// When, in Unix milliseconds.
    pub now_ms: i64,
    /// The approval the call was held for, if any.
    pub approval: Option<AuditApproval<'a>>,
    /// The pinned and current definition of a call pinning refused.
    pub definition: Option<AuditDefinition<'a>>,
}

/// A message refused before policy (see [`Enforcer::refuse_message`]).
#[derive(Debug)]
pub struct RefusedMessage<'a> {
    /// The request id (`None` for a notification or an unreadable body).
    pub id: Option<&'a Id>,
    /// The JSON-RPC method (empty when unknown).
    pub method: &'a str,
    /// The tool it named, if readable.
    pub tool: &'a str,
    /// The tool server.
    pub server: &'a str,
    /// The upstream's session id (empty if none).
    pub mcp_session_id: &'a str,
    /// The fixed rule name: `protocol`.
    pub rule: &'a str,
    /// Why, for the caller and the audit record.
    pub reason: &'a str,
    /// The JSON-RPC error code.
    pub code: i64,
}

/// Who this sidecar is, for audit records.
#[derive(Debug, Clone, Default)]
pub struct PodIdentity {
    /// Pod name.
    pub pod: String,
}

/// Decides calls and writes their audit records.
pub struct Enforcer {
    /// Signs assertions.
    pub signer: AssertionSigner,
    /// Writes audit records.
    pub audit: AuditLog,
    /// Agent-wide rate-limit counters.
    pub agent_limits: AgentRateLimits,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The pod.
    pub pod: PodIdentity,
    /// Tools seen in lists.
    pub inventory: ToolInventory,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer").finish_non_exhaustive()
    }
}

/// A call to decide.
#[derive(Debug)]
pub struct CallRequest<'a> {
    /// The JSON-RPC method.
    pub method: &'a str,
    /// The request id (`None` for a notification).
    pub id: Option<&'a Id>,
    /// The policy name (see [`Governed::Call`]).
    pub name: &'a str,
    /// The arguments.
    pub arguments: Option<&'a Value>,
    /// The upstream's session id (empty if none).
    pub mcp_session_id: &'a str,
    /// A person approved exactly this call and the approval was used for it
    /// (the controller said GRANTED): decided with
    /// [`DecisionRequest::approved`], and named in the audit record.
    pub approval: Option<&'a AuditApproval<'a>>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Enforcer {
    /// Decides one call in `session` against `active`, records the step and the
    /// audit record (before anything is answered or forwarded), and mints the
    /// assertion of a forwarded call.
    ///
    /// A call that needs a person's approval (and is not in dry-run mode) is
    /// returned [`CallOutcome::held`] with nothing recorded: the caller asks
    /// for the approval, then decides the call again with
    /// [`CallRequest::approval`] set (granted), or refuses it with
    /// [`Enforcer::refuse_held`].
    pub fn decide_call(
        &self,
        active: &ActivePolicy,
        upstream: &Upstream,
        session: &mut SessionState,
        call: &CallRequest<'_>,
    ) -> Result<CallOutcome, AuditUnavailable> {
        let started = Instant::now();
        let now_ms = unix_ms();
        let engine = &active.engine;
        let settings = &active.snapshot.content.session;
        let empty = Value::Object(serde_json::Map::new());
        let arguments = call.arguments.unwrap_or(&empty);
        let delegation = session.delegation().cloned();
        // Pins are of tools, and looked up only where they are enforced.
        let current = (call.method == TOOLS_CALL
            && engine.tool_pinning(&upstream.name) == ToolPinning::Enforce)
            .then(|| self.inventory.current_hash(&upstream.name, call.name));
        let (decision, grant_used) = decide_in_session(
            engine,
            &DecisionRequest {
                server: &upstream.name,
                tool: call.name,
                arguments,
                session: &session.history,
                delegation: None,
                initiator: delegation.as_ref().and_then(|d| d.initiator.as_deref()),
                now: now_ms.div_euclid(1000),
                approved: call.approval.is_some(),
                definition: current
                    .as_ref()
                    .map_or(CurrentDefinition::NotApplicable, |hash| {
                        CurrentDefinition::of(hash.as_deref())
                    }),
            },
            delegation.as_deref(),
        );
        let pin = match &decision.reason {
            Reason::ToolPinning(verdict) => Some(verdict),
            _ => None,
        };
        if let Some(verdict) = pin
            && !decision.dry_run
        {
            self.metrics
                .tool_pinning_blocked
                .get_or_create(&PinningLabels {
                    blocked: "call",
                    reason: pinning_reason(verdict),
                })
                .inc();
        }
        let mut allowed = decision.verdict == Verdict::Allow;
        // A call decided again after its approval never asks again (the
        // engine allows it): were it to, it is refused (fail closed).
        let mut needs_approval = decision.verdict == Verdict::RequireApproval
            && !decision.dry_run
            && decision.approval.is_some()
            && call.approval.is_none();
        let mut rule = decision.rule.as_str().to_owned();
        let mut reason = decision.reason.to_string();
        let mut code = jsonrpc::POLICY_DENIED;
        // Calling another agent inside a delegated session hands the task one
        // hop further: refuse here when a grant of the chain allows no more.
        if (allowed || needs_approval)
            && upstream.agent.is_some()
            && let Some(d) = delegation.as_deref()
            && let Some(denial) = further_hop_denial(active, d, grant_used.as_ref())
        {
            (allowed, needs_approval) = (false, false);
            rule = "delegation".to_owned();
            reason = denial;
        }
        // The sidecar's own limits, checked only for calls the rules allow
        // (or would allow once approved: nobody is asked for a call the
        // session limit refuses anyway).
        if (allowed || needs_approval) && session.history.calls() >= settings.max_calls {
            (allowed, needs_approval) = (false, false);
            rule = SESSION_MAX_CALLS_RULE.to_owned();
            reason = format!(
                "the session reached its limit of {} calls",
                settings.max_calls
            );
            code = jsonrpc::LIMIT_EXCEEDED;
        }
        if needs_approval && let Some(requirement) = &decision.approval {
            return Ok(CallOutcome {
                forward: false,
                assertion: None,
                error: None,
                held: Some(HeldCall {
                    ask: self.approval_ask(
                        upstream,
                        session,
                        call,
                        requirement,
                        grant_used.as_ref(),
                    ),
                    rule,
                }),
            });
        }
        if allowed && let Some(limit) = &decision.rate_limit {
            let period = Duration::from_secs(u64::from(limit.period_seconds));
            let taken = match limit.per {
                chaperone_policy::model::RateLimitScope::Session => session
                    .bucket(&limit.id, limit.calls, period)
                    .try_take(started),
                chaperone_policy::model::RateLimitScope::Agent => {
                    self.agent_limits
                        .try_take(&limit.id, limit.calls, period, started)
                }
            };
            if !taken {
                allowed = false;
                rule = limit.id.to_string();
                reason = format!(
                    "rate limit of {} calls per {} s exceeded",
                    limit.calls, limit.period_seconds
                );
                code = jsonrpc::LIMIT_EXCEEDED;
            }
        }
        let forward = allowed || decision.dry_run;
        let step_decision = match (allowed, forward) {
            (true, _) => StepDecision::Allow,
            (false, true) if decision.would_require_approval() => {
                StepDecision::WouldRequireApproval
            }
            (false, true) => StepDecision::WouldDeny,
            (false, false) => StepDecision::Deny,
        };
        let label = step_decision.as_str();
        let effects = engine.effects_of(&upstream.name, call.name);
        if forward {
            session.history.record(&upstream.name, call.name, effects);
        }
        let digest = args_digest(call.arguments);
        let latency = started.elapsed();
        self.metrics.observe_stage(Stage::Decide, latency);
        self.metrics.decision_seconds.observe(latency.as_secs_f64());
        let (correlation, record_hash) = self.write_record(
            Some(active),
            "",
            session,
            &RecordEntry {
                method: call.method,
                tool: call.name,
                server: &upstream.name,
                args_digest: &digest,
                decision: label,
                rule: &rule,
                reason: &reason,
                mcp_session_id: call.mcp_session_id,
                latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                now_ms,
                approval: call.approval.copied(),
                definition: pin.map(|verdict| AuditDefinition {
                    current: verdict.current(),
                    pinned: verdict.pinned(),
                }),
            },
        )?;
        let correlation = correlation.as_str();
        self.metrics.count_decision(
            Some(&active.labels),
            &upstream.name,
            call.name,
            label,
            &rule,
        );
        if !forward {
            // A pinning refusal says why: the agent can list the tools, a
            // person can review and pin the new definition.
            let message = match pin {
                Some(verdict) => format!(
                    "Chaperone denied this call: rule {rule:?}: {verdict} (correlation id {correlation})"
                ),
                None => format!(
                    "Chaperone denied this call: rule {rule:?} (correlation id {correlation})"
                ),
            };
            let data = json!({"rule": rule, "correlationId": correlation});
            return Ok(CallOutcome {
                forward: false,
                assertion: None,
                error: Some(jsonrpc::error_response(call.id, code, &message, Some(data))),
                held: None,
            });
        }
        let iat = now_ms.div_euclid(1000);
        let lifetime = i64::from(active.snapshot.content.assertion.lifetime_seconds);
        let jti = HexId::random();
        let act = delegation
            .as_deref()
            .map(|d| onward_actor(&active.issuer, d, grant_used.as_ref()));
        let ctx = TaskContext {
            effects: session.history.effects_seen(),
            steps: session.history.calls(),
            prev: hex(&record_hash),
        };
        let signing = Instant::now();
        let assertion = self.signer.sign(&Claims {
            iss: &active.issuer,
            sub: delegation.as_ref().map_or(&active.issuer, |d| &d.subject),
            act: act.as_ref(),
            aud: &upstream.audience,
            exp: iat + lifetime,
            iat,
            jti: jti.as_str(),
            sid: session.chaperone_id.as_str(),
            tool: call.name,
            args: &digest,
            snap: active.version(),
            ctx: &ctx,
        });
        self.metrics.stage_since(Stage::Sign, signing);
        Ok(CallOutcome {
            forward: true,
            assertion: Some(assertion),
            error: None,
            held: None,
        })
    }

    /// What a person is asked to approve for `call` in `session`: the
    /// arguments with the rule's redactions, the digest of the unredacted
    /// ones (as assertions carry it), the session's scope and key, its
    /// initiator and delegation chain (`grant` as the last hop's grant).
    fn approval_ask(
        &self,
        upstream: &Upstream,
        session: &SessionState,
        call: &CallRequest<'_>,
        requirement: &ApprovalRequirement,
        grant: Option<&GrantKey>,
    ) -> ApprovalAsk {
        let empty = Value::Object(serde_json::Map::new());
        let arguments = call.arguments.unwrap_or(&empty);
        let digest = args_digest(call.arguments);
        let delegation = session.delegation().map(Arc::as_ref);
        let chain = delegation.map_or_else(Vec::new, |d| {
            let chain = match grant {
                Some(grant) => d.chain_with(grant),
                None => d.chain.clone(),
            };
            chain
                .links
                .iter()
                .map(|link| (link.delegator.to_string(), link.grant.to_string()))
                .collect()
        });
        // The agent scope has no key of its own: the pod is the session.
        let scope_key = match (&*session.scope_key, self.pod.pod.as_str()) {
            ("", "") => session.chaperone_id.as_str().to_owned(),
            ("", pod) => pod.to_owned(),
            (key, _) => key.to_owned(),
        };
        ApprovalAsk {
            policy: requirement.policy.clone(),
            rule: requirement.rule.clone(),
            server: upstream.name.clone(),
            tool: call.name.to_owned(),
            arguments: redact(arguments, &requirement.redact_arguments),
            redacted: requirement.redact_arguments.to_vec(),
            args_digest: digest
                .strip_prefix(DIGEST_PREFIX)
                .unwrap_or(&digest)
                .to_owned(),
            scope: session.scope.as_str(),
            scope_key,
            initiator: delegation.and_then(|d| d.initiator.clone()),
            chain,
            timeout_seconds: requirement.timeout_seconds,
            valid_for_seconds: requirement.valid_for_seconds,
        }
    }

    /// Refuses a held call (see [`Enforcer::decide_call`]): records the step
    /// and the audit record (`decision` `approval`, the approval's name,
    /// phase and decider) and returns the JSON-RPC error naming them.
    pub fn refuse_held(
        &self,
        active: &ActivePolicy,
        upstream: &Upstream,
        session: &mut SessionState,
        call: &CallRequest<'_>,
        held: &HeldCall,
        refusal: &HeldRefusal,
    ) -> Result<Value, AuditUnavailable> {
        let now_ms = unix_ms();
        let decision = StepDecision::Approval;
        let reason = refusal.to_string();
        let (correlation, _) = self.write_record(
            Some(active),
            "",
            session,
            &RecordEntry {
                method: call.method,
                tool: call.name,
                server: &upstream.name,
                args_digest: &args_digest(call.arguments),
                decision: decision.as_str(),
                rule: &held.rule,
                reason: &reason,
                mcp_session_id: call.mcp_session_id,
                latency_us: 0,
                now_ms,
                approval: refusal.audit(),
                definition: None,
            },
        )?;
        self.metrics.count_decision(
            Some(&active.labels),
            &upstream.name,
            call.name,
            decision.as_str(),
            &held.rule,
        );
        let message = format!(
            "Chaperone refused this call: rule {:?} requires a person's approval: {reason} (correlation id {correlation})",
            held.rule
        );
        let mut data = serde_json::Map::new();
        data.insert("rule".to_owned(), json!(held.rule));
        data.insert("correlationId".to_owned(), json!(correlation));
        data.extend(refusal.data());
        Ok(jsonrpc::error_response(
            call.id,
            refusal.code(),
            &message,
            Some(Value::Object(data)),
        ))
    }

    /// Writes the audit record of one decision in `session` (linked to the
    /// session's previous record) and returns its correlation id and hash.
    /// `namespace` names the agent when there is no snapshot (`active`).
    pub fn write_record(
        &self,
        active: Option<&ActivePolicy>,
        namespace: &str,
        session: &mut SessionState,
        entry: &RecordEntry<'_>,
    ) -> Result<(String, [u8; 32]), AuditUnavailable> {
        let (name, namespace) = match active {
            Some(a) => (
                a.engine.agent().name.as_str(),
                a.engine.agent().namespace.as_str(),
            ),
            None => ("", namespace),
        };
        let correlation = HexId::random();
        let prev = session.last_audit_hash.map(|h| hex(&h));
        let time = rfc3339_millis(entry.now_ms);
        let delegation = session.delegation().map(Arc::as_ref);
        let record = AuditRecord {
            agent: AuditAgent {
                name,
                namespace,
                pod: &self.pod.pod,
            },
            approval: entry.approval,
            args: entry.args_digest,
            chain: delegation.map_or(&[][..], |d| &d.audit_chain),
            correlation: correlation.as_str(),
            decision: entry.decision,
            definition: entry.definition,
            initiator: delegation.and_then(|d| d.initiator.as_deref()),
            latency_us: entry.latency_us,
            method: entry.method,
            prev: prev.as_deref(),
            reason: entry.reason,
            rule: entry.rule,
            server: entry.server,
            session: AuditSession {
                chaperone: session.chaperone_id.as_str(),
                mcp: entry.mcp_session_id,
                scope: session.scope.as_str(),
                key: &session.scope_key,
            },
            snapshot: active.map_or(0, ActivePolicy::version),
            time: &time,
            tool: entry.tool,
        };
        // The same facts on the message's trace span (the current one).
        crate::spans::record_decision(&record);
        let writing = Instant::now();
        let written = self.audit.write(&record);
        self.metrics.stage_since(Stage::Audit, writing);
        match written {
            Ok(hash) => {
                session.last_audit_hash = Some(hash);
                Ok((correlation.as_str().to_owned(), hash))
            }
            Err(err) => {
                tracing::error!(error = %err, "audit record not written; refusing the call");
                Err(AuditUnavailable)
            }
        }
    }

    /// Audits a message refused before any rule was consulted (malformed
    /// params, a method not forwarded, an unreadable body) and returns the
    /// JSON-RPC error to answer it with.
    pub fn refuse_message(
        &self,
        active: Option<&ActivePolicy>,
        namespace: &str,
        session: &mut SessionState,
        refused: &RefusedMessage<'_>,
    ) -> Result<Value, AuditUnavailable> {
        let (correlation, _) = self.write_record(
            active,
            namespace,
            session,
            &RecordEntry {
                method: refused.method,
                tool: refused.tool,
                server: refused.server,
                args_digest: &args_digest(None),
                decision: StepDecision::Deny.as_str(),
                rule: refused.rule,
                reason: refused.reason,
                mcp_session_id: refused.mcp_session_id,
                latency_us: 0,
                now_ms: unix_ms(),
                approval: None,
                definition: None,
            },
        )?;
        self.metrics.count_decision(
            active.map(|a| &a.labels),
            refused.server,
            refused.tool,
            StepDecision::Deny.as_str(),
            refused.rule,
        );
        let message = format!(
            "Chaperone refused this message: {} (correlation id {correlation})",
            refused.reason
        );
        let data = json!({"rule": refused.rule, "correlationId": correlation});
        Ok(jsonrpc::error_response(
            refused.id,
            refused.code,
            &message,
            Some(data),
        ))
    }

    /// Filters a list result (`tools`, `resources`, `resourceTemplates`,
    /// `prompts`) in place with the engine's `visible`, recording listed tools
    /// and their definitions in the inventory. Where the server's
    /// `toolPinning` is not `off`, each listed tool's definition is hashed;
    /// where it is `enforce`, a governed tool whose definition does not match
    /// its pin is hidden too (not for a dry-run agent, whose calls to it are
    /// audited as would-deny). Entries without a readable name are dropped.
    pub fn filter_list_result(&self, active: &ActivePolicy, server: &str, result: &mut Value) {
        let Some(result) = result.as_object_mut() else {
            return;
        };
        let engine = &active.engine;
        if let Some(Value::Array(tools)) = result.get_mut("tools") {
            let pinning = engine.tool_pinning(server);
            let hide_blocked = pinning == ToolPinning::Enforce
                && active.snapshot.content.mode != EnforcementMode::DryRun;
            let mut keep = Vec::with_capacity(tools.len());
            let mut listed = Vec::with_capacity(tools.len());
            for tool in tools.iter() {
                let Some(name) = tool.get("name").and_then(Value::as_str) else {
                    keep.push(false);
                    continue;
                };
                let visible = engine.visible(server, name);
                let hash = (pinning != ToolPinning::Off).then(|| ToolInventory::hash_of(tool));
                let mut shown = visible;
                if visible && hide_blocked {
                    let verdict = engine.pin_verdict(server, name, hash.as_deref());
                    if !verdict.passes() {
                        shown = false;
                        self.metrics
                            .tool_pinning_blocked
                            .get_or_create(&PinningLabels {
                                blocked: "listed",
                                reason: pinning_reason(&verdict),
                            })
                            .inc();
                    }
                }
                keep.push(shown);
                listed.push(ListedTool {
                    name,
                    governed: visible,
                    definition: hash.map(|hash| (tool, hash)),
                });
            }
            self.inventory
                .record_list(server, &listed, unix_ms().div_euclid(1000));
            let mut keep = keep.into_iter();
            tools.retain(|_| keep.next().unwrap_or(false));
        }
        let mut filter = |key: &str, field: &str, prefix: &str| {
            if let Some(Value::Array(items)) = result.get_mut(key) {
                items.retain(|item| match item.get(field).and_then(Value::as_str) {
                    Some(name) => engine.visible(server, &format!("{prefix}{name}")),
                    None => false,
                });
            }
        };
        filter("resources", "uri", RESOURCE_PREFIX);
        filter("resourceTemplates", "uriTemplate", RESOURCE_PREFIX);
        filter("prompts", "name", PROMPT_PREFIX);
        // A filtered list holds for this agent and this snapshot only: no
        // shared cache may keep it, and no client may keep it past a policy
        // change (2026-07-28 `CacheableResult`).
        result.insert("ttlMs".to_owned(), Value::from(0));
        result.insert("cacheScope".to_owned(), Value::from("private"));
    }

    /// Filters `message` if it is a JSON-RPC response carrying a list result;
    /// whether it changed shape (callers re-encode only then). A message whose
    /// list shape is spelled in another letter case (`Result`, `TOOLS`, an
    /// item's `Name`) is refused: a case-folding client would read a list the
    /// filter did not see.
    pub fn filter_response(
        &self,
        active: &ActivePolicy,
        server: &str,
        message: &mut Value,
    ) -> Result<bool, String> {
        if let Some(key) = case_variant_list_key(message) {
            return Err(format!(
                "a list result spells {key:?} in another letter case; case-folding clients would read it unfiltered"
            ));
        }
        let is_list = message
            .get("result")
            .and_then(Value::as_object)
            .is_some_and(|r| {
                LIST_KEYS
                    .iter()
                    .any(|k| r.get(*k).is_some_and(Value::is_array))
            });
        if !is_list || message.get("method").is_some() {
            return Ok(false);
        }
        if let Some(result) = message.get_mut("result") {
            self.filter_list_result(active, server, result);
        }
        Ok(true)
    }
}

impl Enforcer {
    /// Filters the list results in the data of one server-sent event (one
    /// message or a batch, read strictly): the new data when it changed,
    /// `None` when it passes as it came, an error (the stream is cut) when the
    /// data cannot be read or spells a list in another letter case.
    pub fn filter_event(
        &self,
        active: &ActivePolicy,
        server: &str,
        data: &str,
        limit: usize,
    ) -> Result<Option<String>, String> {
        let mut value = jsonrpc::parse_strict(data.as_bytes(), limit).map_err(|e| e.to_string())?;
        let changed = match &mut value {
            Value::Array(items) => {
                // Every item is filtered: no short-circuit.
                let mut changed = false;
                for item in items.iter_mut() {
                    changed |= self.filter_response(active, server, item)?;
                }
                changed
            }
            single => self.filter_response(active, server, single)?,
        };
        Ok(changed.then(|| value.to_string()))
    }
}

/// Whether a server-sent event's raw bytes may hold a list result, so that it
/// must be read and filtered: it names a list key in any ASCII letter case,
/// or has a `\u` escape (no list key has a shorter escape) or a non-ASCII
/// character (which may fold to an ASCII letter, `ſ`). Everything else passes
/// unread.
pub fn may_hold_list(raw: &[u8]) -> bool {
    const STEMS: [&[u8]; 3] = [b"tool", b"resource", b"prompt"];
    !raw.is_ascii()
        || raw.windows(2).any(|w| w == b"\\u")
        || STEMS.iter().any(|stem| {
            raw.windows(stem.len())
                .any(|w| w.eq_ignore_ascii_case(stem))
        })
}

/// The keys a list response is read by, at each level: the message, its
/// result, and each listed item.
const LIST_SHAPE_KEYS: [&str; 10] = [
    "result",
    "tools",
    "resources",
    "resourcetemplates",
    "prompts",
    "name",
    "uri",
    "uritemplate",
    "ttlms",
    "cachescope",
];

/// A key of `message`, its result or a listed item that folds to one of
/// [`LIST_SHAPE_KEYS`] without being spelled as the protocol spells it.
fn case_variant_list_key(message: &Value) -> Option<String> {
    let variant = |object: &serde_json::Map<String, Value>| {
        object.keys().find_map(|key| {
            let folded = chaperone_json::fold_key(key);
            let exact = matches!(
                key.as_str(),
                "result"
                    | "tools"
                    | "resources"
                    | "resourceTemplates"
                    | "prompts"
                    | "name"
                    | "uri"
                    | "uriTemplate"
                    | "ttlMs"
                    | "cacheScope"
            );
            (!exact && LIST_SHAPE_KEYS.contains(&folded.as_ref())).then(|| key.clone())
        })
    };
    let message = message.as_object()?;
    if let Some(key) = variant(message) {
        return Some(key);
    }
    let result = message.get("result")?.as_object()?;
    if let Some(key) = variant(result) {
        return Some(key);
    }
    LIST_KEYS
        .iter()
        .filter_map(|k| result.get(*k)?.as_array())
        .flatten()
        .filter_map(Value::as_object)
        .find_map(variant)
}

/// Decides `request` in a session: the agent's own (no delegation), or a
/// delegated one, where each grant the caller holds to this agent is tried as
/// the last hop until one allows (else the first that allows once a person
/// approves; else the first denial is kept). Returns the decision and the
/// grant that allowed it (or asks for the approval).
pub fn decide_in_session(
    engine: &Engine,
    request: &DecisionRequest<'_>,
    delegation: Option<&Delegation>,
) -> (Decision, Option<GrantKey>) {
    let Some(delegation) = delegation.filter(|d| !d.chain.links.is_empty()) else {
        return (engine.decide(request), None);
    };
    let mut first_approval = None;
    let mut first_denial = None;
    for grant in &delegation.last_grants {
        let chain = delegation.chain_with(grant);
        let decision = engine.decide(&DecisionRequest {
            delegation: Some(&chain),
            ..*request
        });
        match decision.verdict {
            Verdict::Allow => return (decision, Some(grant.clone())),
            Verdict::RequireApproval => {
                first_approval.get_or_insert((decision, grant.clone()));
            }
            Verdict::Deny => {
                first_denial.get_or_insert(decision);
            }
        }
    }
    // A grant that covers the call once a person approves beats one that
    // does not cover it at all.
    if let Some((decision, grant)) = first_approval {
        return (decision, Some(grant));
    }
    let denial = first_denial.unwrap_or_else(|| {
        engine.decide(&DecisionRequest {
            delegation: Some(&delegation.chain),
            ..*request
        })
    });
    (denial, None)
}

/// Why the delegated session `delegation` may not be handed one hop further
/// (to another agent), if it may not: a grant of its chain (with `last` as the
/// last hop's grant) allows fewer further hops than that would make.
pub fn further_hop_denial(
    active: &ActivePolicy,
    delegation: &Delegation,
    last: Option<&GrantKey>,
) -> Option<String> {
    let chain = match last {
        Some(grant) => delegation.chain_with(grant),
        None => delegation.chain.clone(),
    };
    let hops = chain.links.len();
    for (i, link) in chain.links.iter().enumerate() {
        let further = hops - i;
        let max_depth = active
            .snapshot
            .content
            .grants_received
            .iter()
            .find(|g| g.grant == link.grant)
            .map_or(0, |g| g.max_depth as usize);
        if further > max_depth {
            return Some(format!(
                "depth limit: grant {} allows {max_depth} further hop(s), handing the task to another agent needs {further}",
                link.grant
            ));
        }
    }
    None
}

/// The `act` claim of an assertion this agent (`issuer`) mints inside a
/// delegated or user-initiated session: itself outermost, holding the caller's
/// authority under `grant`, then the caller's chain.
pub fn onward_actor(issuer: &str, delegation: &Delegation, grant: Option<&GrantKey>) -> Actor {
    Actor {
        sub: issuer.to_owned(),
        grant: grant.map(|g| format!("{}/{}", g.namespace, g.name)),
        act: delegation.caller.clone().map(Box::new),
    }
}

/// The result members that hold lists the policy filters.
pub const LIST_KEYS: [&str; 4] = ["tools", "resources", "resourceTemplates", "prompts"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc::classify_message;

    fn message(text: &str) -> Message {
        classify_message(serde_json::from_str(text).unwrap()).unwrap()
    }

    fn classify(m: &Message) -> Governed<'_> {
        super::classify(m, Era::Both, &[])
    }

    #[test]
    fn classifies_calls_lists_and_pass_through() {
        let m = message(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":1}}}"#,
        );
        assert!(matches!(classify(&m), Governed::Call { name, .. } if name == "t"));
        let m = message(
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}"#,
        );
        assert!(
            matches!(classify(&m), Governed::Call { name, .. } if name == "resource:file:///a")
        );
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#);
        assert!(matches!(classify(&m), Governed::Call { name, .. } if name == "prompt:p"));
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
        assert_eq!(classify(&m), Governed::List);
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#);
        assert_eq!(classify(&m), Governed::Pass);
    }

    #[test]
    fn refuses_calls_it_cannot_read() {
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":1}}"#);
        assert!(matches!(classify(&m), Governed::Malformed(_)));
        let m = message(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":[1]}}"#,
        );
        assert!(matches!(classify(&m), Governed::Malformed(_)));
    }

    #[test]
    fn refuses_params_a_case_folding_server_reads_otherwise() {
        for params in [
            r#"{"name":"t","Arguments":{"amount":5000}}"#,
            r#"{"name":"t","ARGUMENTS":{}}"#,
            r#"{"Name":"t"}"#,
            r#"{"uri":"file:///a","URI":"file:///b"}"#,
        ] {
            let m = message(&format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#
            ));
            assert!(matches!(classify(&m), Governed::Malformed(_)), "{params}");
        }
    }

    #[test]
    fn refuses_list_results_spelled_in_another_case() {
        for text in [
            r#"{"jsonrpc":"2.0","id":1,"Result":{"tools":[]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"TOOLS":[{"name":"x"}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"toolſ":[{"name":"x"}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"Name":"x"}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"resourceTemplates":[{"URITemplate":"x"}]}}"#,
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            assert!(case_variant_list_key(&value).is_some(), "{text}");
        }
        let value: Value = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"x","inputSchema":{"Name":1}}],"nextCursor":"c"}}"#,
        )
        .unwrap();
        assert_eq!(case_variant_list_key(&value), None);
    }

    #[test]
    fn refuses_methods_it_does_not_know_unless_listed() {
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"admin/delete_everything"}"#);
        assert!(matches!(classify(&m), Governed::NotForwarded(_)));
        let listed = ["admin/delete_everything".to_owned()];
        assert_eq!(super::classify(&m, Era::Both, &listed), Governed::Pass);
    }

    #[test]
    fn refuses_methods_of_another_era() {
        let m = message(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        );
        let era = message_era(&m, None);
        assert_eq!(era, Era::Stateless);
        assert!(matches!(
            super::classify(&m, era, &[]),
            Governed::NotForwarded(_)
        ));
        let m = message(r#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen"}"#);
        assert!(matches!(
            super::classify(&m, message_era(&m, Some("2025-06-18")), &[]),
            Governed::NotForwarded(_)
        ));
        assert_eq!(
            super::classify(&m, message_era(&m, Some("2026-07-28")), &[]),
            Governed::Pass
        );
    }
}
