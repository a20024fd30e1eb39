//! `GET /openapi.json`: the node API described from the wire types.
//!
//! Schemas come from `flotilla-api`'s types (`utoipa::ToSchema`), so a type
//! changes in one place, bounds included. Paths come from the router's own
//! table (`api::table`): each entry is one route's method, path, handler
//! and description, and the router is built from those entries, so a route
//! cannot be served without being described. (Attributes on the handlers
//! would not do: they are generic over the backend.)

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
        api::app::Envelope,
        api::app::Binary,
        api::app::EnvelopeResources,
        api::app::SizeValue,
        api::app::RestartMode,
        api::app::RestartPolicy,
        api::app::InstallRequest,
        api::coordinator::Run,
        api::coordinator::Build,
        api::coordinator::Project,
        api::coordinator::Change,
        api::coordinator::ChangeKind,
        api::coordinator::RunState,
        api::coordinator::ProjectStatus,
        api::coordinator::TimelineEntry,
        api::coordinator::BuildFailure,
        api::app::AppInstallation,
        api::app::AppInstance,
        api::app::InstanceState,
        api::app::InstallationState,
        api::app::PortForward,
        api::NodeUpdateRequest,
        api::NodeUpdate,
        api::NodeVersion,
        api::UpdateKind,
        api::UpdateOutcome,
        api::NodeUpdateStatus,
        api::UpdateResult,
    ))
)]
struct Components;

/// How a route takes its data.
pub(crate) enum Body {
    None,
    Json(&'static str),
    Tar,
    /// Raw bytes (stdin for a process).
    Bytes,
}

/// What a route answers with on success.
pub(crate) enum Out {
    Json(&'static str),
    /// A JSON array of the named schema.
    List(&'static str),
    Page(&'static str),
    Empty,
    Text(&'static str),
    Stream(&'static str),
    /// A WebSocket upgrade (101).
    Upgrade,
}

/// Query parameters: (name, type, description).
pub(crate) type Query = &'static [(&'static str, QType, &'static str)];

/// The JSON type of a query parameter.
#[derive(Clone, Copy)]
pub(crate) enum QType {
    Str,
    Int,
    Bool,
}

pub(crate) const PAGE: Query =
    &[("page_token", QType::Str, "Continue after this token"), ("limit", QType::Int, "Items per page (1-1000)")];
pub(crate) const DIR: Query = &[("dir", QType::Str, "Directory relative to the workspace root")];

/// One route as the document describes it. The router is built from the
/// same entries (`api::table`), so a route cannot exist without its entry.
pub(crate) struct Route {
    pub method: HttpMethod,
    pub path: &'static str,
    pub summary: &'static str,
    pub body: Body,
    pub query: Query,
    pub ok: (u16, Out),
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

/// The document served at `/openapi.json`, for the given routes.
pub(crate) fn document<'a>(routes: impl IntoIterator<Item = &'a Route>) -> Doc {
    let mut doc = Components::openapi();
    let error = ResponseBuilder::new()
        .description("Error envelope")
        .content("application/json", json(reference("ApiError")))
        .build();
    for route in routes {
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
        for (name, qtype, desc) in route.query {
            let ty = match qtype {
                QType::Str => Type::String,
                QType::Int => Type::Integer,
                QType::Bool => Type::Boolean,
            };
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
            Body::Tar | Body::Bytes => {
                let ct = if matches!(route.body, Body::Tar) { "application/x-tar" } else { "application/octet-stream" };
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .required(Some(Required::True))
                        .content(ct, ContentBuilder::new().build())
                        .build(),
                ))
            }
        }
        let (status, out) = &route.ok;
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
            Out::List(name) => ok.content(
                "application/json",
                json(RefOr::T(Schema::Array(ArrayBuilder::new().items(reference(name)).build()))),
            ),
            Out::Empty | Out::Upgrade => ok,
            Out::Text(ct) | Out::Stream(ct) => ok.content(*ct, ContentBuilder::new().build()),
        };
        op = op.response(status.to_string(), ok).response("default", error.clone());
        doc.paths.add_path_operation(route.path, vec![route.method.clone()], op.build());
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_schema_referenced_exists() {
        let json = serde_json::to_value(crate::api::document_for_tests()).unwrap();
        let schemas = json["components"]["schemas"].as_object().unwrap();
        let text = json.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(schemas.contains_key(&name), "{name} is referenced but not defined");
        }
        for (path, method) in [
            ("/v1/sandboxes", "post"),
            ("/v1/sandboxes", "get"),
            ("/v1/images/pull", "post"),
            ("/v1/sandboxes/{id}/processes/{p}/output", "get"),
            ("/v1/sandboxes/{id}/processes/{p}/signal", "post"),
            ("/v1/sandboxes/{id}/processes/{p}/stdin", "post"),
            ("/v1/sandboxes/{id}/session", "get"),
        ] {
            assert!(json["paths"][path][method].is_object(), "{method} {path} is not described");
        }
        let ls = &json["paths"]["/v1/sandboxes/{id}/ls"]["get"]["responses"]["200"];
        assert_eq!(ls["content"]["application/json"]["schema"]["type"], "array", "{ls}");
        let pids = &schemas["Resources"]["properties"]["pids"];
        assert_eq!(pids["maximum"], 4194304, "bounds are in the schema: {pids}");
    }
}
