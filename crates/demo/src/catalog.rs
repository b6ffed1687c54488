//! The demo's tools: names, input schemas and canned answers. Pure data, no I/O.

use std::sync::Arc;

use rmcp::model::{JsonObject, Tool};
use serde_json::{Value, json};

/// One tool server's set of tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolSet {
    /// `get_order`, `get_customer`, `refund`, `delete_order`.
    Orders,
    /// `send_email`, `read_inbox`.
    Mail,
    /// `get_invoice`, `issue_credit`, `void_invoice` (examples/delegation).
    Billing,
}

/// A tool of the demo servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoTool {
    /// The MCP tool name.
    pub name: &'static str,
    /// What it does (the `description` in `tools/list`).
    pub description: &'static str,
    /// Required string arguments.
    pub strings: &'static [&'static str],
    /// Required number arguments.
    pub numbers: &'static [&'static str],
}

const ORDERS: &[DemoTool] = &[
    DemoTool {
        name: "get_order",
        description: "Look an order up by id.",
        strings: &["id"],
        numbers: &[],
    },
    DemoTool {
        name: "get_customer",
        description: "Look a customer up by id (contact and payment details).",
        strings: &["id"],
        numbers: &[],
    },
    DemoTool {
        name: "refund",
        description: "Refund part of an order, in EUR.",
        strings: &["orderId"],
        numbers: &["amount"],
    },
    DemoTool {
        name: "delete_order",
        description: "Delete an order and its history.",
        strings: &["id"],
        numbers: &[],
    },
];

const MAIL: &[DemoTool] = &[
    DemoTool {
        name: "send_email",
        description: "Send an email.",
        strings: &["to", "subject"],
        numbers: &[],
    },
    DemoTool {
        name: "read_inbox",
        description: "Read the newest messages of the support inbox.",
        strings: &[],
        numbers: &[],
    },
];

const BILLING: &[DemoTool] = &[
    DemoTool {
        name: "get_invoice",
        description: "Look an invoice up by id.",
        strings: &["invoice"],
        numbers: &[],
    },
    DemoTool {
        name: "issue_credit",
        description: "Credit part of an invoice back to the customer, in EUR.",
        strings: &["invoice"],
        numbers: &["amount"],
    },
    DemoTool {
        name: "void_invoice",
        description: "Void an invoice.",
        strings: &["invoice"],
        numbers: &[],
    },
];

/// Every tool set.
pub const ALL_SETS: [ToolSet; 3] = [ToolSet::Orders, ToolSet::Mail, ToolSet::Billing];

impl ToolSet {
    /// The server name the demo's AgentIdentity gives this set.
    pub fn server_name(self) -> &'static str {
        match self {
            ToolSet::Orders => "orders",
            ToolSet::Mail => "mail",
            ToolSet::Billing => "billing",
        }
    }

    /// The set of the server called `name`.
    pub fn from_server_name(name: &str) -> Option<Self> {
        ALL_SETS.into_iter().find(|set| set.server_name() == name)
    }

    /// Its tools, in listing order.
    pub fn tools(self) -> &'static [DemoTool] {
        match self {
            ToolSet::Orders => ORDERS,
            ToolSet::Mail => MAIL,
            ToolSet::Billing => BILLING,
        }
    }

    /// The tool called `name`, if this set has it.
    pub fn tool(self, name: &str) -> Option<&'static DemoTool> {
        self.tools().iter().find(|tool| tool.name == name)
    }
}

impl DemoTool {
    /// The MCP description of the tool (name, description, JSON schema).
    pub fn to_mcp(&self) -> Tool {
        let mut properties = serde_json::Map::new();
        for name in self.strings {
            properties.insert((*name).to_owned(), json!({"type": "string"}));
        }
        for name in self.numbers {
            properties.insert((*name).to_owned(), json!({"type": "number"}));
        }
        let required: Vec<&str> = self.strings.iter().chain(self.numbers).copied().collect();
        let schema: JsonObject = match json!({
            "type": "object",
            "properties": properties,
            "required": required,
        }) {
            Value::Object(schema) => schema,
            _ => unreachable!("json! of an object literal is an object"),
        };
        Tool::new(self.name, self.description, Arc::new(schema))
    }

    /// The names of required arguments missing from `args`.
    pub fn missing_arguments(&self, args: &JsonObject) -> Vec<&'static str> {
        self.strings
            .iter()
            .chain(self.numbers)
            .filter(|name| !args.contains_key(**name))
            .copied()
            .collect()
    }

    /// The tool's answer to `args`: plausible, fixed data for the demo.
    pub fn answer(&self, args: &JsonObject) -> Value {
        let arg = |name: &str| args.get(name).cloned().unwrap_or(Value::Null);
        match self.name {
            "get_order" => json!({
                "id": arg("id"),
                "status": "delivered",
                "customerId": "C-42",
                "total": 129.90,
                "currency": "EUR",
                "items": [{"sku": "KB-101", "name": "Mechanical keyboard", "qty": 1}],
            }),
            "get_customer" => json!({
                "id": arg("id"),
                "name": "Jo Example",
                "email": "jo@example.com",
                "iban": "DE89 3704 0044 0532 0130 00",
            }),
            "refund" => json!({
                "refundId": "R-7781",
                "orderId": arg("orderId"),
                "amount": arg("amount"),
                "currency": "EUR",
                "status": "issued",
            }),
            "delete_order" => json!({"id": arg("id"), "deleted": true}),
            "get_invoice" => json!({
                "invoice": arg("invoice"),
                "customerId": "C-42",
                "total": 480,
                "currency": "EUR",
                "status": "open",
            }),
            "issue_credit" => json!({
                "creditId": "CR-3301",
                "invoice": arg("invoice"),
                "amount": arg("amount"),
                "currency": "EUR",
                "status": "issued",
            }),
            "void_invoice" => json!({"invoice": arg("invoice"), "status": "void"}),
            "send_email" => json!({
                "messageId": "<m-5521@mail.demo>",
                "to": arg("to"),
                "status": "queued",
            }),
            "read_inbox" => json!({
                "messages": [{
                    "from": "jo@example.com",
                    "subject": "Where is my refund?",
                    "body": "Please refund to my account DE89 3704 0044 0532 0130 00.",
                }],
            }),
            other => json!({"error": format!("no canned answer for {other}")}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_a_canned_answer() {
        for set in ALL_SETS {
            for tool in set.tools() {
                let answer = tool.answer(&JsonObject::new());
                assert!(answer.get("error").is_none(), "{}", tool.name);
            }
        }
    }

    #[test]
    fn schemas_require_the_arguments() {
        let refund = ToolSet::Orders.tool("refund").unwrap();
        let schema = refund.to_mcp().input_schema;
        assert_eq!(schema["required"], json!(["orderId", "amount"]));
        assert_eq!(schema["properties"]["amount"]["type"], "number");
        let args: JsonObject = serde_json::from_value(json!({"orderId": "A-1"})).unwrap();
        assert_eq!(refund.missing_arguments(&args), ["amount"]);
    }

    #[test]
    fn server_names_round_trip() {
        for set in ALL_SETS {
            assert_eq!(ToolSet::from_server_name(set.server_name()), Some(set));
        }
        assert_eq!(ToolSet::from_server_name("bank"), None);
    }
}
