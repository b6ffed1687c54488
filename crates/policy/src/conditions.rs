//! Compiled `when` conditions of rules and grants, evaluated in three-valued
//! logic: a condition is true, false, or unknown (its argument is missing or of
//! the wrong type, its CEL expression fails, or — when listing tools — it reads
//! arguments or session state not known yet).
//!
//! Unknown fails closed: an allow rule (or a grant) matches only when every
//! condition is true, a deny rule matches unless some condition is false. So a
//! condition on a missing field never allows, and a deny rule cannot be dodged by
//! leaving a field out or sending `"1000"` where a number is expected.

use std::cmp::Ordering;

use regex::{Regex, RegexBuilder};
use serde_json::{Number, Value};
use thiserror::Error;

use crate::decision::{AgentKey, DelegationLink};
use crate::expression::CompiledExpression;
use crate::model::{ArgMatcher, Conditions, DelegationCondition, JsonType, SessionCondition};
use crate::session::{EffectSet, SessionHistory};

/// Largest compiled size of one `regex` matcher (bytes): keeps a hostile pattern
/// from costing the sidecar memory or time.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Why a condition does not compile.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConditionError {
    /// An argument matcher sets no operator or several.
    #[error(
        "argument matcher on {pointer:?} must set exactly one operator (equals, in, prefix, regex, lessThan, lessThanOrEqual, greaterThan, greaterThanOrEqual, exists, type); it sets {count}"
    )]
    OperatorCount {
        /// The matcher's pointer.
        pointer: String,
        /// Operators set.
        count: usize,
    },
    /// The pointer is not an RFC 6901 JSON pointer.
    #[error("{pointer:?} is not a JSON pointer (RFC 6901: '/a/b/0', '~0' for '~', '~1' for '/')")]
    InvalidPointer {
        /// The pointer.
        pointer: String,
    },
    /// The regular expression does not parse.
    #[error("regex {pattern:?} on {pointer:?} is invalid: {message}")]
    InvalidRegex {
        /// The matcher's pointer.
        pointer: String,
        /// The pattern.
        pattern: String,
        /// The parser's message.
        message: String,
    },
    /// The regular expression compiles to more than [`REGEX_SIZE_LIMIT`].
    #[error("regex on {pointer:?} is too big (compiled size above {limit} bytes); simplify it")]
    RegexTooBig {
        /// The matcher's pointer.
        pointer: String,
        /// The limit.
        limit: usize,
    },
    /// `in` has no values.
    #[error("`in` on {pointer:?} lists no values")]
    EmptyIn {
        /// The matcher's pointer.
        pointer: String,
    },
    /// A numeric bound is not a finite number.
    #[error("numeric bound on {pointer:?} is not a finite number")]
    InvalidNumber {
        /// The matcher's pointer.
        pointer: String,
    },
    /// The CEL expression does not parse.
    #[error("CEL expression does not parse: {message}")]
    InvalidExpression {
        /// The parser's message.
        message: String,
    },
    /// The CEL expression names a variable that does not exist at decision time.
    #[error(
        "CEL expression uses unknown variable {name:?}; the variables are args, tool, server, agent, session and delegation"
    )]
    UnknownVariable {
        /// The variable.
        name: String,
    },
}

/// The value of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn of(b: bool) -> Self {
        if b { Truth::True } else { Truth::False }
    }
}

/// Who initiated the task.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Initiator<'a> {
    /// A verified user.
    User(&'a str),
    /// The chain's origin agent.
    Agent(&'a AgentKey),
    /// Not known yet (listing tools).
    Unknown,
}

impl Initiator<'_> {
    fn is(&self, name: &str) -> bool {
        match self {
            Initiator::User(user) => *user == name,
            Initiator::Agent(agent) => name
                .split_once('/')
                .is_some_and(|(ns, n)| ns == agent.namespace && n == agent.name),
            Initiator::Unknown => false,
        }
    }
}

/// What conditions are evaluated against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EvalContext<'a> {
    pub server: &'a str,
    pub tool: &'a str,
    /// `None` while listing tools: arguments are not known yet.
    pub arguments: Option<&'a Value>,
    /// `None` while listing tools.
    pub session: Option<&'a SessionHistory>,
    /// The agent whose rule (or whose received grant) is evaluated.
    pub agent: &'a AgentKey,
    /// Delegation hops before this agent.
    pub depth: usize,
    /// The links before this agent.
    pub chain: &'a [DelegationLink],
    pub initiator: Initiator<'a>,
}

/// Which part of a condition decided its value (for explanations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConditionPart {
    Argument(usize),
    /// The session conditions as a whole (not known while listing).
    Session,
    AnyEffectSeen,
    ToolsCalled,
    CallsFewerThan,
    ToolCallsFewerThan,
    Delegated,
    MaxDepth,
    Initiators,
    Expression,
}

/// The outcome of evaluating conditions: their value and, unless true, the first
/// part that made it false (or else unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Evaluation {
    pub truth: Truth,
    pub part: Option<ConditionPart>,
}

#[derive(Clone, Copy, Debug)]
enum Comparison {
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
}

#[derive(Clone, Debug)]
enum ArgTest {
    /// `equals` a string: the common case, compared without the generic walk.
    EqualsString(String),
    Equals(Value),
    In(Vec<Value>),
    Prefix(String),
    Regex(Regex),
    Compare(Comparison, JsonNumber),
    Exists(bool),
    Type(JsonType),
}

/// One operator's test with its constants borrowed: [`TestRef::apply`] is the
/// one statement of what every operator means, for [`CompiledArgMatcher`] and
/// for the flat copies in [`arena`].
#[derive(Clone, Copy, Debug)]
enum TestRef<'a> {
    EqualsString(&'a str),
    Equals(&'a Value),
    In(&'a [Value]),
    Prefix(&'a str),
    Regex(&'a Regex),
    Compare(Comparison, JsonNumber),
    Exists(bool),
    Type(JsonType),
}

impl ArgTest {
    fn as_ref(&self) -> TestRef<'_> {
        match self {
            ArgTest::EqualsString(s) => TestRef::EqualsString(s),
            ArgTest::Equals(v) => TestRef::Equals(v),
            ArgTest::In(values) => TestRef::In(values),
            ArgTest::Prefix(p) => TestRef::Prefix(p),
            ArgTest::Regex(r) => TestRef::Regex(r),
            ArgTest::Compare(c, n) => TestRef::Compare(*c, *n),
            ArgTest::Exists(b) => TestRef::Exists(*b),
            ArgTest::Type(t) => TestRef::Type(*t),
        }
    }
}

impl TestRef<'_> {
    /// The test on the value its pointer resolved to (`None`: absent).
    #[inline]
    fn apply(self, value: Option<&Value>) -> Truth {
        match (self, value) {
            (TestRef::Exists(expected), value) => Truth::of(value.is_some() == expected),
            (_, None) => Truth::Unknown,
            (TestRef::EqualsString(expected), Some(v)) => Truth::of(v.as_str() == Some(expected)),
            (TestRef::Equals(expected), Some(v)) => Truth::of(json_equal(v, expected)),
            (TestRef::In(values), Some(v)) => Truth::of(values.iter().any(|e| json_equal(v, e))),
            (TestRef::Type(t), Some(v)) => Truth::of(has_type(v, t)),
            (TestRef::Prefix(prefix), Some(Value::String(s))) => {
                Truth::of(s.as_bytes().starts_with(prefix.as_bytes()))
            }
            (TestRef::Regex(regex), Some(Value::String(s))) => Truth::of(regex.is_match(s)),
            (TestRef::Compare(comparison, bound), Some(Value::Number(n))) => {
                let Some(ordering) = JsonNumber::from_number(n).and_then(|n| n.compare(bound))
                else {
                    return Truth::Unknown;
                };
                Truth::of(match comparison {
                    Comparison::Less => ordering == Ordering::Less,
                    Comparison::LessOrEqual => ordering != Ordering::Greater,
                    Comparison::Greater => ordering == Ordering::Greater,
                    Comparison::GreaterOrEqual => ordering != Ordering::Less,
                })
            }
            // A string operator on a non-string, a number operator on a non-number.
            _ => Truth::Unknown,
        }
    }
}

/// Follows parsed JSON pointer tokens (`(key, array index)`) from `root`: the
/// one pointer walk, for [`CompiledArgMatcher`] and [`arena`].
#[inline]
fn resolve_tokens<'v, 'k>(
    root: &'v Value,
    tokens: impl IntoIterator<Item = (&'k str, Option<usize>)>,
) -> Option<&'v Value> {
    let mut current = root;
    for (key, index) in tokens {
        current = match current {
            Value::Object(map) => map.get(key)?,
            Value::Array(items) => items.get(index?)?,
            _ => return None,
        };
    }
    Some(current)
}

#[derive(Debug)]
struct PointerToken {
    key: String,
    index: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct CompiledArgMatcher {
    pointer: String,
    tokens: Vec<PointerToken>,
    test: ArgTest,
}

#[derive(Debug)]
struct ToolCallRef {
    whole: String,
    server_and_name: Option<(String, String)>,
}

#[derive(Debug, Default)]
struct CompiledSession {
    any_effect_seen: Option<EffectSet>,
    tools_called: Vec<ToolCallRef>,
    calls_fewer_than: Option<u32>,
    tool_calls_fewer_than: Option<u32>,
}

/// Compiled `when` conditions.
#[derive(Debug, Default)]
pub(crate) struct CompiledConditions {
    delegation: Option<DelegationCondition>,
    session: Option<CompiledSession>,
    args: Vec<CompiledArgMatcher>,
    expression: Option<CompiledExpression>,
}

/// A JSON number compared exactly: integers as integers (beyond 64 bits as
/// well), floats as floats, and integer-vs-float without rounding the integer.
#[derive(Clone, Copy, Debug)]
enum JsonNumber {
    Integer(i128),
    Float(f64),
}

impl JsonNumber {
    fn from_number(n: &Number) -> Option<Self> {
        if let Some(i) = n.as_i64() {
            Some(JsonNumber::Integer(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(JsonNumber::Integer(i128::from(u)))
        } else {
            n.as_f64().filter(|f| f.is_finite()).map(JsonNumber::Float)
        }
    }

    fn compare(self, other: JsonNumber) -> Option<Ordering> {
        match (self, other) {
            (JsonNumber::Integer(a), JsonNumber::Integer(b)) => Some(a.cmp(&b)),
            (JsonNumber::Float(a), JsonNumber::Float(b)) => a.partial_cmp(&b),
            (JsonNumber::Integer(a), JsonNumber::Float(b)) => compare_integer_float(a, b),
            (JsonNumber::Float(a), JsonNumber::Integer(b)) => {
                compare_integer_float(b, a).map(Ordering::reverse)
            }
        }
    }
}

/// Compares integer `i` with float `f` exactly.
fn compare_integer_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // Beyond ±2^126 every i128 value is on one side.
    const LIMIT: f64 = 8.507_059_173_023_462e37;
    if f >= LIMIT {
        return Some(Ordering::Less);
    }
    if f <= -LIMIT {
        return Some(Ordering::Greater);
    }
    let floor = f.floor();
    // Within ±2^126 the floor of a float is an exactly representable integer.
    let floor_int = floor as i128;
    Some(match i.cmp(&floor_int) {
        Ordering::Equal if floor == f => Ordering::Equal,
        Ordering::Equal => Ordering::Less,
        other => other,
    })
}

/// JSON equality with numbers compared by value (`1 == 1.0`).
pub(crate) fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (JsonNumber::from_number(x), JsonNumber::from_number(y)) {
                (Some(x), Some(y)) => x.compare(y) == Some(Ordering::Equal),
                _ => x == y,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

fn has_type(value: &Value, json_type: JsonType) -> bool {
    match json_type {
        JsonType::String => value.is_string(),
        JsonType::Number => value.is_number(),
        JsonType::Integer => match value {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        JsonType::Boolean => value.is_boolean(),
        JsonType::Array => value.is_array(),
        JsonType::Object => value.is_object(),
        JsonType::Null => value.is_null(),
    }
}

fn parse_pointer(pointer: &str) -> Option<Vec<PointerToken>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    rest.split('/')
        .map(|raw| {
            let mut key = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => key.push('~'),
                        Some('1') => key.push('/'),
                        _ => return None,
                    }
                } else {
                    key.push(c);
                }
            }
            let canonical_index = key == "0"
                || (!key.is_empty()
                    && !key.starts_with('0')
                    && key.bytes().all(|b| b.is_ascii_digit()));
            let index = if canonical_index {
                key.parse::<usize>().ok()
            } else {
                None
            };
            Some(PointerToken { key, index })
        })
        .collect()
}

impl CompiledArgMatcher {
    fn new(matcher: &ArgMatcher) -> Result<Self, ConditionError> {
        let pointer = matcher.pointer.clone();
        let tokens = parse_pointer(&pointer).ok_or_else(|| ConditionError::InvalidPointer {
            pointer: pointer.clone(),
        })?;
        let number = |n: &Number| {
            JsonNumber::from_number(n).ok_or_else(|| ConditionError::InvalidNumber {
                pointer: pointer.clone(),
            })
        };
        let mut tests = Vec::new();
        match &matcher.equals {
            Some(Value::String(s)) => tests.push(ArgTest::EqualsString(s.clone())),
            Some(v) => tests.push(ArgTest::Equals(v.clone())),
            None => {}
        }
        if let Some(values) = &matcher.in_ {
            if values.is_empty() {
                return Err(ConditionError::EmptyIn { pointer });
            }
            tests.push(ArgTest::In(values.clone()));
        }
        if let Some(prefix) = &matcher.prefix {
            tests.push(ArgTest::Prefix(prefix.clone()));
        }
        if let Some(pattern) = &matcher.regex {
            tests.push(ArgTest::Regex(compile_regex(&pointer, pattern)?));
        }
        if let Some(n) = &matcher.less_than {
            tests.push(ArgTest::Compare(Comparison::Less, number(n)?));
        }
        if let Some(n) = &matcher.less_than_or_equal {
            tests.push(ArgTest::Compare(Comparison::LessOrEqual, number(n)?));
        }
        if let Some(n) = &matcher.greater_than {
            tests.push(ArgTest::Compare(Comparison::Greater, number(n)?));
        }
        if let Some(n) = &matcher.greater_than_or_equal {
            tests.push(ArgTest::Compare(Comparison::GreaterOrEqual, number(n)?));
        }
        if let Some(b) = matcher.exists {
            tests.push(ArgTest::Exists(b));
        }
        if let Some(t) = matcher.type_ {
            tests.push(ArgTest::Type(t));
        }
        if tests.len() != 1 {
            return Err(ConditionError::OperatorCount {
                pointer,
                count: tests.len(),
            });
        }
        let test = tests.remove(0);
        Ok(Self {
            pointer,
            tokens,
            test,
        })
    }

    fn resolve<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        resolve_tokens(root, self.tokens.iter().map(|t| (t.key.as_str(), t.index)))
    }

    fn evaluate(&self, arguments: &Value) -> Truth {
        self.test.as_ref().apply(self.resolve(arguments))
    }

    /// A short description: `/amount lessThanOrEqual 100`.
    pub(crate) fn describe(&self) -> String {
        let pointer = &self.pointer;
        match &self.test {
            ArgTest::EqualsString(s) => format!("{pointer} equals {}", Value::from(s.as_str())),
            ArgTest::Equals(v) => format!("{pointer} equals {v}"),
            ArgTest::In(values) => format!("{pointer} in {}", Value::Array(values.clone())),
            ArgTest::Prefix(p) => format!("{pointer} prefix {p:?}"),
            ArgTest::Regex(r) => format!("{pointer} regex {:?}", r.as_str()),
            ArgTest::Compare(c, n) => {
                let n = match n {
                    JsonNumber::Integer(i) => i.to_string(),
                    JsonNumber::Float(f) => f.to_string(),
                };
                let op = match c {
                    Comparison::Less => "lessThan",
                    Comparison::LessOrEqual => "lessThanOrEqual",
                    Comparison::Greater => "greaterThan",
                    Comparison::GreaterOrEqual => "greaterThanOrEqual",
                };
                format!("{pointer} {op} {n}")
            }
            ArgTest::Exists(b) => format!("{pointer} exists {b}"),
            ArgTest::Type(t) => format!("{pointer} type {t:?}"),
        }
    }
}

fn compile_regex(pointer: &str, pattern: &str) -> Result<Regex, ConditionError> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(4 * REGEX_SIZE_LIMIT)
        .build()
        .map_err(|error| match error {
            regex::Error::CompiledTooBig(_) => ConditionError::RegexTooBig {
                pointer: pointer.to_owned(),
                limit: REGEX_SIZE_LIMIT,
            },
            other => ConditionError::InvalidRegex {
                pointer: pointer.to_owned(),
                pattern: pattern.to_owned(),
                message: other.to_string(),
            },
        })
}

impl CompiledSession {
    fn new(condition: &SessionCondition) -> Self {
        Self {
            any_effect_seen: (!condition.any_effect_seen.is_empty())
                .then(|| EffectSet::of(&condition.any_effect_seen)),
            tools_called: condition
                .tools_called
                .iter()
                .map(|whole| ToolCallRef {
                    whole: whole.clone(),
                    server_and_name: whole
                        .split_once('/')
                        .map(|(s, n)| (s.to_owned(), n.to_owned())),
                })
                .collect(),
            calls_fewer_than: condition.calls_fewer_than,
            tool_calls_fewer_than: condition.tool_calls_fewer_than,
        }
    }

    fn evaluate(&self, ctx: &EvalContext<'_>) -> Option<ConditionPart> {
        let session = ctx.session?;
        if let Some(effects) = self.any_effect_seen
            && !session.effects_seen().intersects(effects)
        {
            return Some(ConditionPart::AnyEffectSeen);
        }
        let called = |t: &ToolCallRef| {
            session.tool_name_calls(&t.whole) > 0
                || t.server_and_name
                    .as_ref()
                    .is_some_and(|(s, n)| session.tool_calls(s, n) > 0)
        };
        if !self.tools_called.iter().all(called) {
            return Some(ConditionPart::ToolsCalled);
        }
        if let Some(limit) = self.calls_fewer_than
            && session.calls() >= limit
        {
            return Some(ConditionPart::CallsFewerThan);
        }
        if let Some(limit) = self.tool_calls_fewer_than
            && session.tool_calls(ctx.server, ctx.tool) >= limit
        {
            return Some(ConditionPart::ToolCallsFewerThan);
        }
        None
    }
}

/// `Err` with the part that is false; `Ok(true)` when the initiator is needed
/// but not known yet.
fn evaluate_delegation(
    condition: &DelegationCondition,
    ctx: &EvalContext<'_>,
) -> Result<bool, ConditionPart> {
    if let Some(delegated) = condition.delegated
        && (ctx.depth > 0) != delegated
    {
        return Err(ConditionPart::Delegated);
    }
    if let Some(max_depth) = condition.max_depth
        && ctx.depth > max_depth as usize
    {
        return Err(ConditionPart::MaxDepth);
    }
    if !condition.initiators.is_empty() {
        if matches!(ctx.initiator, Initiator::Unknown) {
            return Ok(true);
        }
        if !condition.initiators.iter().any(|i| ctx.initiator.is(i)) {
            return Err(ConditionPart::Initiators);
        }
    }
    Ok(false)
}

impl CompiledConditions {
    /// Compiles `when`; `None` is "always".
    pub(crate) fn new(conditions: Option<&Conditions>) -> Result<Self, ConditionError> {
        let Some(conditions) = conditions else {
            return Ok(Self::default());
        };
        Ok(Self {
            delegation: conditions.delegation.clone(),
            session: conditions.session.as_ref().map(CompiledSession::new),
            args: conditions
                .args
                .iter()
                .map(CompiledArgMatcher::new)
                .collect::<Result<_, _>>()?,
            expression: conditions
                .expression
                .as_deref()
                .map(CompiledExpression::new)
                .transpose()?,
        })
    }

    /// The argument matchers, when they are the only conditions (no
    /// delegation, session or expression part): such conditions are true when
    /// every matcher is, false when one is false, unknown otherwise (and
    /// unknown when the arguments are not known, unless there is no matcher).
    pub(crate) fn args_only(&self) -> Option<&[CompiledArgMatcher]> {
        (self.delegation.is_none() && self.session.is_none() && self.expression.is_none())
            .then_some(&self.args[..])
    }

    /// Whether a CEL expression is among the conditions.
    pub(crate) fn has_expression(&self) -> bool {
        self.expression.is_some()
    }

    /// Evaluates every condition, cheapest first, stopping at the first false.
    pub(crate) fn evaluate(&self, ctx: &EvalContext<'_>) -> Evaluation {
        let mut unknown: Option<ConditionPart> = None;
        if let Some(delegation) = &self.delegation {
            match evaluate_delegation(delegation, ctx) {
                Err(part) => {
                    return Evaluation {
                        truth: Truth::False,
                        part: Some(part),
                    };
                }
                Ok(true) => {
                    unknown = Some(ConditionPart::Initiators);
                }
                Ok(false) => {}
            }
        }
        if let Some(session) = &self.session {
            match ctx.session {
                None => {
                    unknown.get_or_insert(ConditionPart::Session);
                }
                Some(_) => {
                    if let Some(part) = session.evaluate(ctx) {
                        return Evaluation {
                            truth: Truth::False,
                            part: Some(part),
                        };
                    }
                }
            }
        }
        match ctx.arguments {
            None => {
                if !self.args.is_empty() {
                    unknown.get_or_insert(ConditionPart::Argument(0));
                }
            }
            Some(arguments) => {
                for (i, matcher) in self.args.iter().enumerate() {
                    match matcher.evaluate(arguments) {
                        Truth::True => {}
                        Truth::False => {
                            return Evaluation {
                                truth: Truth::False,
                                part: Some(ConditionPart::Argument(i)),
                            };
                        }
                        Truth::Unknown => {
                            unknown.get_or_insert(ConditionPart::Argument(i));
                        }
                    }
                }
            }
        }
        if let Some(expression) = &self.expression {
            match expression.evaluate(ctx) {
                Truth::True => {}
                Truth::False => {
                    return Evaluation {
                        truth: Truth::False,
                        part: Some(ConditionPart::Expression),
                    };
                }
                Truth::Unknown => {
                    unknown.get_or_insert(ConditionPart::Expression);
                }
            }
        }
        match unknown {
            Some(part) => Evaluation {
                truth: Truth::Unknown,
                part: Some(part),
            },
            None => Evaluation {
                truth: Truth::True,
                part: None,
            },
        }
    }

    /// Describes a part of these conditions for explanations.
    pub(crate) fn describe(&self, part: ConditionPart) -> String {
        match part {
            ConditionPart::Argument(i) => self
                .args
                .get(i)
                .map(CompiledArgMatcher::describe)
                .unwrap_or_else(|| "argument matcher".to_owned()),
            ConditionPart::Session => "session".to_owned(),
            ConditionPart::AnyEffectSeen => "session.anyEffectSeen".to_owned(),
            ConditionPart::ToolsCalled => "session.toolsCalled".to_owned(),
            ConditionPart::CallsFewerThan => "session.callsFewerThan".to_owned(),
            ConditionPart::ToolCallsFewerThan => "session.toolCallsFewerThan".to_owned(),
            ConditionPart::Delegated => "delegation.delegated".to_owned(),
            ConditionPart::MaxDepth => "delegation.maxDepth".to_owned(),
            ConditionPart::Initiators => "delegation.initiators".to_owned(),
            ConditionPart::Expression => "expression".to_owned(),
        }
    }
}

#[path = "arena.rs"]
pub(crate) mod arena;

#[cfg(test)]
#[path = "conditions_tests.rs"]
mod tests;
