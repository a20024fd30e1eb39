//! `GET /openapi.json`: the node API described from the wire types.
//!
//! Schemas come from `flotilla-api`'s types (`utoipa::ToSchema`), so a type
//! changes in one place. Paths are listed here as a table rather than as
//! attributes on the handlers, which are generic over the backend; a test
//! checks the table against the router so neither drifts.

use flotilla_api as api;
use utoipa::OpenApi;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Doc, Ref, RefOr, Required, ResponseBuilder};

#[derive(OpenApi)]
#[openapi(
    info(title = "Flotilla node API", description = "Sandboxes, images, operations and events of one node."),
    components(schemas(
        api::Sandbox,
        api::SandboxState,
        api::BackendKind,
        api::NetworkMode,
        api::Resources,
        api::Step,
        api::CreateSandboxRequest,
        api::UpdateSandboxRequest,
        api::ImportSummary,
        api::LsEntry,
        api::EntryKind,
        api::RemoveAllRequest,
        api::ExecRequest,
        api::ProcessInfo,
        api::ProcessState,
        api::SignalRequest,
        api::AgentHealth,
        api::BackendInfo,
        api::NodeInfo,
        api::Operation,
        api::OperationState,
        api::OperationKind,
        api::NodeEvent,
        api::EventBody,
        api::Image,
        api::ImportImageRequest,
        api::PullImageRequest,
        api::PromoteImageRequest,
        api::VmPoolRequest,
        api::VmPool,
        api::GitImportRequest,
        api::GitImportSummary,
        api::ApiError,
        api::ErrorCode,
        api::ExitStatus,
    ))
)]
struct Components;

/// How a route takes and gives its data.
enum Body {
    None,
    Json(&'static str),
    Tar,
}

enum Out {
    Json(&'static str),
    Page(&'static str),
    Empty,
    Text(&'static str),
    Stream(&'static str),
}

/// Query parameters by name: (name, description).
type Query = &'static [(&'static str, &'static str)];

const PAGE: Query = &[("page_token", "Continue after this token"), ("limit", "Items per page (1-1000)")];
const DIR: Query = &[("dir", "Directory relative to the workspace root")];

struct Route {
    method: HttpMethod,
    path: &'static str,
    summary: &'static str,
    body: Body,
    query: Query,
    ok: (u16, Out),
}

fn routes() -> Vec<Route> {
    use Body as B;
    use HttpMethod::*;
    use Out as O;
    let r = |method, path, summary, body, query, ok| Route { method, path, summary, body, query, ok };
    vec![
        r(Get, "/healthz", "Liveness", B::None, &[], (200, O::Text("text/plain"))),
        r(Get, "/metrics", "Prometheus metrics", B::None, &[], (200, O::Text("text/plain"))),
        r(Get, "/openapi.json", "This document", B::None, &[], (200, O::Text("application/json"))),
        r(Get, "/v1/node", "Describe the node", B::None, &[], (200, O::Json("NodeInfo"))),
        r(Get, "/v1/node/pools", "List warm pools of microVMs", B::None, PAGE, (200, O::Page("VmPool"))),
        r(
            Put,
            "/v1/node/pools",
            "Set a warm pool of microVMs (size 0 removes it)",
            B::Json("VmPoolRequest"),
            &[],
            (200, O::Page("VmPool")),
        ),
        r(Get, "/v1/sandboxes", "List sandboxes", B::None, PAGE, (200, O::Page("Sandbox"))),
        r(
            Post,
            "/v1/sandboxes",
            "Create a sandbox (an operation)",
            B::Json("CreateSandboxRequest"),
            &[],
            (202, O::Json("Operation")),
        ),
        r(Get, "/v1/sandboxes/{id}", "Show a sandbox", B::None, &[], (200, O::Json("Sandbox"))),
        r(
            Patch,
            "/v1/sandboxes/{id}",
            "Change labels, deadlines or limits",
            B::Json("UpdateSandboxRequest"),
            &[],
            (200, O::Json("Sandbox")),
        ),
        r(Delete, "/v1/sandboxes/{id}", "Delete a sandbox", B::None, &[], (204, O::Empty)),
        r(
            Post,
            "/v1/sandboxes/{id}/start",
            "Start a sandbox (an operation)",
            B::None,
            &[],
            (202, O::Json("Operation")),
        ),
        r(Post, "/v1/sandboxes/{id}/stop", "Stop a sandbox", B::None, &[], (200, O::Json("Sandbox"))),
        r(
            Post,
            "/v1/sandboxes/{id}/restart",
            "Restart a sandbox (an operation)",
            B::None,
            &[],
            (202, O::Json("Operation")),
        ),
        r(
            Put,
            "/v1/sandboxes/{id}/workspace",
            "Stream a tar into the workspace",
            B::Tar,
            DIR,
            (200, O::Json("ImportSummary")),
        ),
        r(
            Get,
            "/v1/sandboxes/{id}/workspace",
            "Stream the workspace out as a tar",
            B::None,
            DIR,
            (200, O::Stream("application/x-tar")),
        ),
        r(
            Post,
            "/v1/sandboxes/{id}/workspace/git",
            "Export a git revision into the workspace (an operation)",
            B::Json("GitImportRequest"),
            &[],
            (202, O::Json("Operation")),
        ),
        r(Get, "/v1/sandboxes/{id}/ls", "List a workspace directory", B::None, DIR, (200, O::Json("LsEntry"))),
        r(
            Post,
            "/v1/sandboxes/{id}/removeall",
            "Remove workspace paths",
            B::Json("RemoveAllRequest"),
            &[],
            (204, O::Empty),
        ),
        r(
            Post,
            "/v1/sandboxes/{id}/exec",
            "Run a command; frames stream back",
            B::Json("ExecRequest"),
            &[],
            (200, O::Stream("application/octet-stream")),
        ),
        r(Get, "/v1/sandboxes/{id}/processes", "Detached processes", B::None, &[], (200, O::Json("ProcessInfo"))),
        r(
            Get,
            "/v1/operations",
            "Operations kept (24 hours), newest first",
            B::None,
            PAGE,
            (200, O::Page("Operation")),
        ),
        r(
            Get,
            "/v1/operations/{id}",
            "Show an operation, optionally waiting for it",
            B::None,
            &[("wait", "Wait up to this long (e.g. 30s) for it to finish")],
            (200, O::Json("Operation")),
        ),
        r(
            Get,
            "/v1/events",
            "Server-sent events; resume with Last-Event-ID",
            B::None,
            &[("after", "Replay events after this id")],
            (200, O::Stream("text/event-stream")),
        ),
        r(Get, "/v1/images", "List images", B::None, PAGE, (200, O::Page("Image"))),
        r(
            Post,
            "/v1/images",
            "Import an image from a path on the node (an operation)",
            B::Json("ImportImageRequest"),
            &[],
            (202, O::Json("Operation")),
        ),
        r(
            Post,
            "/v1/images/pull",
            "Pull an image from an OCI registry (an operation)",
            B::Json("PullImageRequest"),
            &[],
            (202, O::Json("Operation")),
        ),
        r(Get, "/v1/images/{reference}", "Show an image", B::None, &[], (200, O::Json("Image"))),
        r(Delete, "/v1/images/{reference}", "Delete an image tag", B::None, &[], (204, O::Empty)),
        r(
            Post,
            "/v1/images/{reference}/promote",
            "Point another tag at this image's version",
            B::Json("PromoteImageRequest"),
            &[],
            (200, O::Json("Image")),
        ),
    ]
}

fn method_name(m: &HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => "get",
        HttpMethod::Put => "put",
        HttpMethod::Post => "post",
        HttpMethod::Delete => "delete",
        HttpMethod::Patch => "patch",
        HttpMethod::Options => "options",
        HttpMethod::Head => "head",
        HttpMethod::Trace => "trace",
    }
}

fn reference(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

fn json(schema: RefOr<Schema>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

/// The document served at `/openapi.json`.
pub fn document() -> Doc {
    let mut doc = Components::openapi();
    let error = ResponseBuilder::new()
        .description("Error envelope")
        .content("application/json", json(reference("ApiError")))
        .build();
    for route in routes() {
        let mut op = OperationBuilder::new()
            .summary(Some(route.summary))
            .operation_id(Some(format!(
                "{}{}",
                method_name(&route.method),
                route.path.replace(['/', '{', '}', '.'], "_")
            )))
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        for seg in route.path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(seg)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        }
        for (name, desc) in route.query {
            let ty = if *name == "limit" || *name == "after" { Type::Integer } else { Type::String };
            op = op.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(*desc))
                    .schema(Some(ObjectBuilder::new().schema_type(ty))),
            );
        }
        match route.body {
            Body::None => {}
            Body::Json(name) => {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .required(Some(Required::True))
                        .content("application/json", json(reference(name)))
                        .build(),
                ))
            }
            Body::Tar => {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .required(Some(Required::True))
                        .content("application/x-tar", ContentBuilder::new().build())
                        .build(),
                ))
            }
        }
        let (status, out) = route.ok;
        let ok = ResponseBuilder::new().description("Success");
        let ok = match out {
            Out::Json(name) => ok.content("application/json", json(reference(name))),
            Out::Page(name) => {
                let page = ObjectBuilder::new()
                    .property("items", ArrayBuilder::new().items(reference(name)))
                    .required("items")
                    .property("next_page_token", ObjectBuilder::new().schema_type(Type::String));
                ok.content("application/json", json(RefOr::T(Schema::Object(page.build()))))
            }
            Out::Empty => ok,
            Out::Text(ct) | Out::Stream(ct) => ok.content(ct, ContentBuilder::new().build()),
        };
        op = op.response(status.to_string(), ok).response("default", error.clone());
        doc.paths.add_path_operation(route.path, vec![route.method], op.build());
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_referenced_exists() {
        let doc = document();
        let json = serde_json::to_value(&doc).unwrap();
        let schemas = json["components"]["schemas"].as_object().unwrap();
        let text = json.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(schemas.contains_key(&name), "{name} is referenced but not defined");
        }
        assert!(json["paths"]["/v1/sandboxes"]["post"].is_object());
        assert!(json["paths"]["/v1/sandboxes"]["get"].is_object());
        assert!(json["paths"]["/v1/images/pull"]["post"].is_object());
        assert!(schemas.contains_key("PullImageRequest"));
    }
}
