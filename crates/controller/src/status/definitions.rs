//! The I/O of tool definition pinning around the status writer: reading
//! back what the AgentIdentities' statuses say of their tools' definitions
//! (a new leader's memory), and keeping each agent's definition texts in its
//! ConfigMap `<agent>-tool-definitions` (server-side apply, field manager
//! [`FIELD_MANAGER`], owned by the AgentIdentity).

use std::collections::BTreeMap;

use chaperone_api::{AgentIdentity, tool_definitions::config_map_name};
use chaperone_policy::AgentKey;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};

use super::{FIELD_MANAGER, writer::AgentMemory};
use crate::tool_definitions::{
    AgentTools, definitions_config_map, definitions_data, known_from_status,
};

/// AgentIdentities listed per request.
const PAGE: u32 = 500;

/// What every AgentIdentity's status says of its tools' definitions, and its
/// uid, by agent.
pub(super) async fn read_known_definitions(
    client: &Client,
) -> Result<BTreeMap<AgentKey, AgentMemory>, kube::Error> {
    let api = Api::<AgentIdentity>::all(client.clone());
    let mut params = ListParams::default().limit(PAGE);
    let mut agents = BTreeMap::new();
    loop {
        let page = api.list(&params).await?;
        for object in &page.items {
            let key = AgentKey::new(object.namespace().unwrap_or_default(), object.name_any());
            let tools = object
                .status
                .as_ref()
                .map(|s| s.discovered_tools.as_slice())
                .unwrap_or_default();
            agents.insert(
                key,
                AgentMemory {
                    uid: object.uid(),
                    known: known_from_status(tools),
                    config_map: None,
                },
            );
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(agents)
}

/// Brings `agent`'s definitions' ConfigMap to [`definitions_data`] of
/// `tools` and what it held (read once per leadership term), when that
/// differs from what it holds; returns `memory` updated. An agent none of
/// whose tools has a definition leaves its ConfigMap, if any, as it is.
pub(super) async fn write_definitions(
    client: &Client,
    agent: &AgentKey,
    mut memory: AgentMemory,
    tools: &AgentTools,
) -> Result<AgentMemory, kube::Error> {
    if !tools.tools.iter().any(|t| t.definition_hash.is_some()) {
        return Ok(memory);
    }
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &agent.namespace);
    let name = config_map_name(&agent.name);
    let previous = match memory.config_map.take() {
        Some(data) => data,
        None => config_maps
            .get_opt(&name)
            .await?
            .and_then(|c| c.data)
            .unwrap_or_default(),
    };
    let data = definitions_data(tools, &previous);
    if data == previous {
        memory.config_map = Some(previous);
        return Ok(memory);
    }
    let uid = match memory.uid.take() {
        Some(uid) => uid,
        None => match Api::<AgentIdentity>::namespaced(client.clone(), &agent.namespace)
            .get_opt(&agent.name)
            .await?
            .and_then(|a| a.uid())
        {
            Some(uid) => uid,
            // Deleted meanwhile: its ConfigMap goes with it.
            None => return Ok(memory),
        },
    };
    let object = definitions_config_map(agent, &uid, data.clone());
    config_maps
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    memory.uid = Some(uid);
    memory.config_map = Some(data);
    Ok(memory)
}
