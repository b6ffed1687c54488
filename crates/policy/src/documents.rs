//! The one loader of Chaperone's custom resources from YAML or JSON text, for
//! everything that reads policy from files rather than from a cluster: the
//! sidecar's standalone mode (`--policy-dir`) and `chaperonectl policy`. Pure:
//! callers read the files and hand over their text, named for error messages.
//!
//! Rules, for each text ([`DocumentSet::add`]):
//!
//! 1. The text is a YAML stream (JSON is YAML): documents separated by `---`.
//!    Empty documents are skipped; a key given twice in one mapping is refused.
//! 2. Every other document is a mapping with a string `kind`.
//! 3. A document of one of our kinds (`AgentIdentity`, `ToolPolicy`,
//!    `DelegationGrant`) has `apiVersion` [`API_VERSION`] and the model's shape.
//! 4. A document of any other kind is skipped (a Deployment in the same file),
//!    unless its `apiVersion` is in our group: a misspelt kind is refused, not
//!    silently dropped.
//! 5. One object per kind, namespace (`default` when absent) and name across
//!    every text added: a second is refused, naming where the first came from.
//!
//! A text is added whole or not at all. Then [`DocumentSet::agent`] picks the
//! agent to act as or to explain: named as `namespace/name`, or as `name` when
//! only one AgentIdentity has that name, or left unnamed when there is only one.

use std::collections::BTreeMap;

use serde_json::Value;
use thiserror::Error;

use crate::compile::{Inventory, ObjectKind, ObjectRef, ObjectSet, key_of};
use crate::decision::ObjectKey;
use crate::model::{API_VERSION, AgentIdentitySpec, Document, Object};

/// File name extensions of CR files, for callers that list a directory.
pub const DOCUMENT_FILE_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// The API group of [`API_VERSION`], with its slash.
const API_GROUP_PREFIX: &str = "chaperone.dev/";

/// A text that cannot be added to a [`DocumentSet`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DocumentError {
    /// The text is not YAML (or JSON).
    #[error("{file}: not valid YAML: {message}")]
    Syntax {
        /// Where the text came from.
        file: String,
        /// The parser's message, with the position.
        message: String,
    },
    /// A document is not a mapping with a string `kind`.
    #[error("{file}: document {index} is not a Kubernetes object (a mapping with a string kind)")]
    NotAnObject {
        /// Where the text came from.
        file: String,
        /// The document's position in the text, from 1 (empty ones counted out).
        index: usize,
    },
    /// A document of one of our kinds has another apiVersion.
    #[error("{file}: {kind} {name} (document {index}): apiVersion {found:?} is not {API_VERSION}")]
    ApiVersion {
        /// Where the text came from.
        file: String,
        /// The document's position in the text, from 1.
        index: usize,
        /// Its kind.
        kind: ObjectKind,
        /// Its `metadata.name`.
        name: String,
        /// Its `apiVersion` (empty when absent).
        found: String,
    },
    /// A document of our API group has a kind we do not know.
    #[error(
        "{file}: document {index}: {api_version} has no kind {kind:?} (AgentIdentity, ToolPolicy or DelegationGrant)"
    )]
    UnknownKind {
        /// Where the text came from.
        file: String,
        /// The document's position in the text, from 1.
        index: usize,
        /// Its `apiVersion`.
        api_version: String,
        /// Its kind.
        kind: String,
    },
    /// A Chaperone document does not have the model's shape.
    #[error("{file}: {kind} {name} (document {index}): {message}")]
    Invalid {
        /// Where the text came from.
        file: String,
        /// The document's position in the text, from 1.
        index: usize,
        /// Its kind.
        kind: ObjectKind,
        /// Its `metadata.name`.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The object was already read.
    #[error("{file}: {object} is already defined in {first}")]
    Duplicate {
        /// Where the second definition came from.
        file: String,
        /// The object.
        object: ObjectRef,
        /// Where the first one came from.
        first: String,
    },
}

/// No single AgentIdentity answers to the name asked for.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AgentChoiceError {
    /// The documents hold no AgentIdentity at all.
    #[error("no AgentIdentity")]
    NoAgentIdentity,
    /// None has the name asked for.
    #[error("no AgentIdentity {0}")]
    NotFound(String),
    /// No name was given and there are several.
    #[error("several AgentIdentities ({}): name one", join(.0))]
    Several(Vec<ObjectKey>),
    /// A bare name was given and several namespaces have it.
    #[error("several AgentIdentities are named {name} ({}): give namespace/name", join(.candidates))]
    Ambiguous {
        /// The name given.
        name: String,
        /// The AgentIdentities of that name.
        candidates: Vec<ObjectKey>,
    },
}

fn join(keys: &[ObjectKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Chaperone objects read from one or more texts, each object once, with where
/// it came from.
#[derive(Clone, Debug, Default)]
pub struct DocumentSet {
    objects: ObjectSet,
    files: BTreeMap<ObjectRef, String>,
}

impl DocumentSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the Chaperone documents of `text`, read from `file` (any name: it
    /// only appears in errors and [`DocumentSet::file_of`]). Returns how many
    /// it held; on an error nothing of `text` is added.
    pub fn add(&mut self, file: &str, text: &str) -> Result<usize, DocumentError> {
        let documents = parse_documents(file, text)?;
        let mut added = BTreeMap::new();
        for document in &documents {
            let object = object_ref(document);
            let first = self.files.get(&object).or_else(|| added.get(&object));
            if let Some(first) = first {
                return Err(DocumentError::Duplicate {
                    file: file.to_owned(),
                    object,
                    first: first.clone(),
                });
            }
            added.insert(object, file.to_owned());
        }
        self.files.extend(added);
        let count = documents.len();
        self.objects.extend(documents);
        Ok(count)
    }

    /// The objects, sorted by kind in the order they were read.
    pub fn objects(&self) -> &ObjectSet {
        &self.objects
    }

    /// The objects as the compiler's [`Inventory`].
    pub fn inventory(&self) -> Inventory<'_> {
        self.objects.inventory()
    }

    /// Where `object` was read from.
    pub fn file_of(&self, object: &ObjectRef) -> Option<&str> {
        self.files.get(object).map(String::as_str)
    }

    /// The AgentIdentity named `wanted`: `namespace/name`, or a bare `name`
    /// that only one AgentIdentity has; with `None`, the only AgentIdentity.
    pub fn agent(
        &self,
        wanted: Option<&str>,
    ) -> Result<&Object<AgentIdentitySpec>, AgentChoiceError> {
        let identities = &self.objects.identities;
        if identities.is_empty() {
            return Err(AgentChoiceError::NoAgentIdentity);
        }
        let candidates: Vec<&Object<AgentIdentitySpec>> = match wanted {
            None => identities.iter().collect(),
            Some(wanted) => match wanted.split_once('/') {
                Some(_) => {
                    let key = ObjectKey::parse(wanted, "default");
                    identities.iter().filter(|i| key_of(i) == key).collect()
                }
                None => identities
                    .iter()
                    .filter(|i| i.metadata.name == wanted)
                    .collect(),
            },
        };
        match (candidates.as_slice(), wanted) {
            ([only], _) => Ok(only),
            ([], Some(wanted)) => Err(AgentChoiceError::NotFound(wanted.to_owned())),
            (several, None) => Err(AgentChoiceError::Several(
                several.iter().map(|i| key_of(i)).collect(),
            )),
            (several, Some(wanted)) => Err(AgentChoiceError::Ambiguous {
                name: wanted.to_owned(),
                candidates: several.iter().map(|i| key_of(i)).collect(),
            }),
        }
    }
}

/// The Chaperone documents of one text (rules 1 to 4 of the module
/// documentation; duplicates are checked by [`DocumentSet::add`]).
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Document>, DocumentError> {
    let values: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|error| DocumentError::Syntax {
            file: file.to_owned(),
            message: error.to_string(),
        })?;
    let mut documents = Vec::new();
    for (position, value) in values.into_iter().enumerate() {
        let index = position + 1;
        let Some(kind) = value.get("kind").and_then(Value::as_str) else {
            return Err(DocumentError::NotAnObject {
                file: file.to_owned(),
                index,
            });
        };
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(kind) = chaperone_kind(kind) else {
            if api_version.starts_with(API_GROUP_PREFIX) {
                return Err(DocumentError::UnknownKind {
                    file: file.to_owned(),
                    index,
                    api_version: api_version.to_owned(),
                    kind: kind.to_owned(),
                });
            }
            continue;
        };
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>")
            .to_owned();
        if api_version != API_VERSION {
            return Err(DocumentError::ApiVersion {
                file: file.to_owned(),
                index,
                kind,
                name,
                found: api_version.to_owned(),
            });
        }
        let document = serde_json::from_value(value).map_err(|error| DocumentError::Invalid {
            file: file.to_owned(),
            index,
            kind,
            name: name.clone(),
            message: error.to_string(),
        })?;
        documents.push(document);
    }
    Ok(documents)
}

/// Our kind of that name, if it is one.
fn chaperone_kind(kind: &str) -> Option<ObjectKind> {
    match kind {
        "AgentIdentity" => Some(ObjectKind::AgentIdentity),
        "ToolPolicy" => Some(ObjectKind::ToolPolicy),
        "DelegationGrant" => Some(ObjectKind::DelegationGrant),
        _ => None,
    }
}

fn object_ref(document: &Document) -> ObjectRef {
    let (kind, key) = match document {
        Document::AgentIdentity(o) => (ObjectKind::AgentIdentity, key_of(o)),
        Document::ToolPolicy(o) => (ObjectKind::ToolPolicy, key_of(o)),
        Document::DelegationGrant(o) => (ObjectKind::DelegationGrant, key_of(o)),
    };
    ObjectRef { kind, key }
}

#[cfg(test)]
#[path = "documents_tests.rs"]
mod tests;
