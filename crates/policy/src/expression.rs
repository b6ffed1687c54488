//! CEL `expression` conditions (the `cel` crate). Parsed and checked when a
//! policy compiles: an expression may only name the variables that exist when a
//! call is decided ([`CEL_VARIABLES`]), so a typo fails the policy instead of
//! silently denying every call. At decision time only the variables an expression
//! names are built.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr};
use cel::objects::Value as CelValue;
use cel::{Context, Env, IdedExpr, Program};
use serde_json::Value;

use crate::conditions::{ConditionError, EvalContext, Initiator, Truth};

/// The variables a CEL expression may use.
pub const CEL_VARIABLES: [&str; 6] = ["args", "tool", "server", "agent", "session", "delegation"];

/// A parsed, checked CEL expression.
pub(crate) struct CompiledExpression {
    program: Program,
    /// Which of [`CEL_VARIABLES`] the expression names (bit i for variable i).
    uses: u8,
}

impl std::fmt::Debug for CompiledExpression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledExpression")
            .field("uses", &self.uses)
            .finish_non_exhaustive()
    }
}

/// The standard CEL environment, built once per process.
fn standard_env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

impl CompiledExpression {
    /// Parses `source` and checks that it names only [`CEL_VARIABLES`].
    pub(crate) fn new(source: &str) -> Result<Self, ConditionError> {
        let program =
            standard_env()
                .compile(source)
                .map_err(|errors| ConditionError::InvalidExpression {
                    message: errors.to_string(),
                })?;
        let mut free = Vec::new();
        free_variables(program.expression(), &mut Vec::new(), &mut free);
        let mut uses = 0u8;
        for name in free {
            match CEL_VARIABLES.iter().position(|v| *v == name) {
                Some(i) => uses |= 1 << i,
                None => {
                    return Err(ConditionError::UnknownVariable {
                        name: name.to_owned(),
                    });
                }
            }
        }
        Ok(Self { program, uses })
    }

    fn uses(&self, name: &str) -> bool {
        CEL_VARIABLES
            .iter()
            .position(|v| *v == name)
            .is_some_and(|i| self.uses & (1 << i) != 0)
    }

    /// Evaluates the expression: `True`/`False` for a boolean result, `Unknown`
    /// when it cannot be evaluated (listing, an error such as a missing key, or a
    /// non-boolean result).
    pub(crate) fn evaluate(&self, ctx: &EvalContext<'_>) -> Truth {
        let (Some(arguments), Some(session)) = (ctx.arguments, ctx.session) else {
            return Truth::Unknown;
        };
        let mut context = Context::with_env(Arc::clone(standard_env()));
        if self.uses("args") {
            context.add_variable_from_value("args", json_to_cel(arguments));
        }
        if self.uses("tool") {
            context.add_variable_from_value("tool", ctx.tool);
        }
        if self.uses("server") {
            context.add_variable_from_value("server", ctx.server);
        }
        if self.uses("agent") {
            let agent: HashMap<String, CelValue> = [
                ("name".to_owned(), CelValue::from(ctx.agent.name.as_str())),
                (
                    "namespace".to_owned(),
                    CelValue::from(ctx.agent.namespace.as_str()),
                ),
            ]
            .into();
            context.add_variable_from_value("agent", agent);
        }
        if self.uses("session") {
            let effects: Vec<CelValue> = session
                .effects_seen()
                .iter()
                .map(|e| CelValue::from(e.as_str()))
                .collect();
            let mut tools: Vec<CelValue> = session
                .tool_names_called()
                .into_iter()
                .map(CelValue::from)
                .collect();
            tools.extend(session.tools_called().into_iter().map(CelValue::from));
            let map: HashMap<String, CelValue> = [
                (
                    "calls".to_owned(),
                    CelValue::Int(i64::from(session.calls())),
                ),
                ("effects".to_owned(), CelValue::from(effects)),
                ("tools".to_owned(), CelValue::from(tools)),
            ]
            .into();
            context.add_variable_from_value("session", map);
        }
        if self.uses("delegation") {
            let initiator = match ctx.initiator {
                Initiator::User(user) => user.to_owned(),
                Initiator::Agent(agent) => agent.to_string(),
                Initiator::Unknown => String::new(),
            };
            let chain: Vec<CelValue> = ctx
                .chain
                .iter()
                .map(|link| CelValue::from(link.delegator.to_string()))
                .collect();
            let depth = i64::try_from(ctx.depth).unwrap_or(i64::MAX);
            let map: HashMap<String, CelValue> = [
                ("depth".to_owned(), CelValue::Int(depth)),
                ("initiator".to_owned(), CelValue::from(initiator)),
                ("chain".to_owned(), CelValue::from(chain)),
            ]
            .into();
            context.add_variable_from_value("delegation", map);
        }
        match self.program.execute(&context) {
            Ok(CelValue::Bool(true)) => Truth::True,
            Ok(CelValue::Bool(false)) => Truth::False,
            _ => Truth::Unknown,
        }
    }
}

/// Converts JSON to a CEL value: integers that fit i64 become `int`, larger ones
/// `uint`, the rest `double`.
fn json_to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                CelValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                CelValue::UInt(u)
            } else {
                CelValue::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => CelValue::from(s.as_str()),
        Value::Array(items) => CelValue::from(items.iter().map(json_to_cel).collect::<Vec<_>>()),
        Value::Object(map) => {
            let map: HashMap<String, CelValue> = map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect();
            CelValue::from(map)
        }
    }
}

/// Collects the identifiers an expression reads that no comprehension (macro)
/// binds.
fn free_variables<'e>(expr: &'e IdedExpr, bound: &mut Vec<&'e str>, out: &mut Vec<&'e str>) {
    match &expr.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            if !name.starts_with('@')
                && !bound.contains(&name.as_str())
                && !out.contains(&name.as_str())
            {
                out.push(name);
            }
        }
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                free_variables(target, bound, out);
            }
            for arg in &call.args {
                free_variables(arg, bound, out);
            }
        }
        Expr::Select(select) => free_variables(&select.operand, bound, out),
        Expr::List(list) => {
            for element in &list.elements {
                free_variables(element, bound, out);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => free_variables(&field.value, bound, out),
                    EntryExpr::MapEntry(entry) => {
                        free_variables(&entry.key, bound, out);
                        free_variables(&entry.value, bound, out);
                    }
                }
            }
        }
        Expr::Struct(structure) => {
            for entry in &structure.entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => free_variables(&field.value, bound, out),
                    EntryExpr::MapEntry(entry) => {
                        free_variables(&entry.key, bound, out);
                        free_variables(&entry.value, bound, out);
                    }
                }
            }
        }
        Expr::Comprehension(comprehension) => {
            free_variables(&comprehension.iter_range, bound, out);
            free_variables(&comprehension.accu_init, bound, out);
            let before = bound.len();
            bound.push(&comprehension.iter_var);
            if let Some(second) = &comprehension.iter_var2 {
                bound.push(second);
            }
            bound.push(&comprehension.accu_var);
            free_variables(&comprehension.loop_cond, bound, out);
            free_variables(&comprehension.loop_step, bound, out);
            free_variables(&comprehension.result, bound, out);
            bound.truncate(before);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_known_variables_and_macro_bindings() {
        let e = CompiledExpression::new("args.items.all(i, i.qty < 10) && tool == 'x'").unwrap();
        assert!(e.uses("args"));
        assert!(e.uses("tool"));
        assert!(!e.uses("session"));
        CompiledExpression::new("session.effects.exists(e, e == 'read')").unwrap();
        CompiledExpression::new("has(args.to) && args.to.endsWith('@example.com')").unwrap();
    }

    #[test]
    fn rejects_unknown_variables() {
        let err = CompiledExpression::new("request.amount < 10").unwrap_err();
        assert_eq!(
            err,
            ConditionError::UnknownVariable {
                name: "request".into()
            }
        );
        // A macro variable does not leak out of its macro.
        assert!(CompiledExpression::new("args.a.all(i, i > 0) && i > 0").is_err());
    }

    #[test]
    fn rejects_syntax_errors() {
        assert!(matches!(
            CompiledExpression::new("args.amount <"),
            Err(ConditionError::InvalidExpression { .. })
        ));
    }
}
