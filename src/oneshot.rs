//! One-shot queries (`readOnce` over WebSocket, `POST /v1/query` over HTTP): one page of a
//! query for a caller, the cursor of the next page, and the documents its `expand` paths refer
//! to — each of those checked against its own ACL and the caller's token scopes.

use std::collections::BTreeMap;

use serde::Serialize;
use uuid::Uuid;
use vibe_actors::acl::{HeldCertificates, Operation};
use vibe_actors::query::keyset::Keyset;
use vibe_actors::query::{
    QueryError, QueryRequest, QuerySpec, Scope, parse_expand, referenced_ids,
};

use crate::app::App;
use crate::auth::{Access, Claims};
use crate::store::StoreError;
use crate::wire::{Document, DocumentView, views};

/// One page of a query.
#[derive(Debug)]
pub struct QueryPage {
    pub docs: Vec<Document>,
    /// Pass as `cursor` (with the same query) for the next page; absent on the last page.
    pub next: Option<String>,
    /// With `expand`: the referenced documents the caller may read, by id.
    pub expanded: Option<BTreeMap<Uuid, Document>>,
    /// Whom the page is for: documents carry their ACL only to their owner.
    pub caller: String,
}

impl Serialize for QueryPage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            docs: Vec<DocumentView<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            next: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            expanded: Option<BTreeMap<Uuid, DocumentView<'a>>>,
        }
        let caller = Some(self.caller.as_str());
        Wire {
            docs: views(&self.docs, caller),
            next: self.next.as_deref(),
            expanded: self
                .expanded
                .as_ref()
                .map(|e| e.iter().map(|(id, d)| (*id, d.view(caller))).collect()),
        }
        .serialize(s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OneShotError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The documents `expand` names hold more than `http.max_page_bytes`.
    #[error("the expanded documents exceed {0} bytes; ask for fewer (a smaller limit)")]
    ExpansionTooLarge(usize),
    /// The documents of a page name more ids to expand than one page expands.
    #[error(
        "the page's documents name more than {0} ids to expand; ask for fewer (a smaller limit)"
    )]
    TooManyReferences(usize),
}

/// Runs `request` for the holder of `token` and its `claims` (who may read its type: the
/// caller checked).
pub async fn query_page(
    app: &App,
    token: &str,
    claims: &Claims,
    request: &QueryRequest,
) -> Result<QueryPage, OneShotError> {
    let caller = claims.subject.as_str();
    let spec = QuerySpec::parse(request, caller, app.config.query.limits())?;
    let expand = parse_expand(&request.expand)?;
    let after = request
        .cursor
        .as_deref()
        .map(|c| Keyset::decode(&spec, c))
        .transpose()?;
    let budget = app.config.http.max_page_bytes;
    let (mut docs, more) = app
        .store
        .query_page(&spec, caller, after.as_ref(), budget)
        .await?;
    // From the page as read, so a page the filter below empties still leads on. The cursor may
    // carry the sort values of a row the filter hides; the SQL let the caller read that row in
    // this request's own statement (the filter only catches a certificate lost since), so it
    // tells nothing the caller could not read.
    let next = if more {
        docs.last().map(|d| Keyset::after(&spec, d).encode(&spec))
    } else {
        None
    };
    // Certificates are loaded once per page, and only if some document's rule tests them.
    let needs_credentials = docs
        .iter()
        .any(|d| d.owner != caller && d.acl.uses_certificates(Operation::Read));
    let held = if needs_credentials {
        app.store.credentials(caller).await?
    } else {
        HeldCertificates::default()
    };
    if !matches!(spec.scope, Scope::Own(_)) {
        // The SQL already applied the read rule; this is the in-memory evaluation of the same
        // rule, so a disagreement can only hide, never reveal.
        docs.retain(|d| d.acl.allows(Operation::Read, Some(caller), &d.owner, &held));
    }
    let expanded = if expand.is_empty() {
        None
    } else {
        let mut ids: Vec<Uuid> = docs
            .iter()
            .flat_map(|d| expand.iter().flat_map(|path| referenced_ids(d, path)))
            .collect();
        ids.sort();
        ids.dedup();
        // Bounded, and refused past the bound rather than cut: a cut dropped ids as if the caller
        // could not read them.
        let most = app.config.query.max_limit as usize * vibe_actors::query::MAX_EXPAND;
        if ids.len() > most {
            return Err(OneShotError::TooManyReferences(most));
        }
        // The types the token may read (its scopes and its attenuation checks, as a query of
        // each type would be checked), before anything is fetched: documents of the others must
        // not count against the budget either.
        let types: Vec<String> = app
            .store
            .types_of(&ids)
            .await?
            .into_iter()
            .filter(|t| {
                claims.permits(Access::Read, t)
                    && app.tokens.verify(token, Access::Read, Some(t)).is_ok()
            })
            .collect();
        let found = if types.is_empty() {
            Vec::new()
        } else {
            app.store
                .fetch_readable(&ids, &types, caller, budget)
                .await?
                .ok_or(OneShotError::ExpansionTooLarge(budget))?
        };
        let held = if found
            .iter()
            .any(|d| d.owner != caller && d.acl.uses_certificates(Operation::Read))
        {
            app.store.credentials(caller).await?
        } else {
            held
        };
        let mut expanded = BTreeMap::new();
        for doc in found {
            if doc
                .acl
                .allows(Operation::Read, Some(caller), &doc.owner, &held)
            {
                expanded.insert(doc.id, doc);
            }
        }
        Some(expanded)
    };
    Ok(QueryPage {
        docs,
        next,
        expanded,
        caller: caller.to_owned(),
    })
}
