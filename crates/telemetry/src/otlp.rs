//! The OTLP trace exporter, configured by the standard `OTEL_*` variables
//! (<https://opentelemetry.io/docs/specs/otel/protocol/exporter/> and
//! <https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/>):
//!
//! | Variable | Meaning |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | the traces URL, used as it is |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | the base URL (HTTP adds `/v1/traces`) |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` | `grpc` or `http/protobuf` (default) |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` | `key=value,…` (values percent-decoded) |
//! | `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` | milliseconds (default 10000) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | default `parentbased_always_on` |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | the resource |
//! | `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none` | off |
//!
//! No endpoint: no exporter, and spans cost only what `tracing` costs.
//! Settings are read with a lookup function, so they are tested without
//! touching the process environment.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::FilterFn;

use crate::TelemetryError;

/// The variable of the export headers (credentials, often).
pub const HEADERS_ENV: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// The variable of the traces-only export headers.
pub const TRACES_HEADERS_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// The variable of the resource's `service.name`.
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`grpc`, usually port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`, usually port 4318).
    HttpProtobuf,
}

impl OtlpProtocol {
    /// Its name in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how spans are exported, read from `OTEL_*` variables.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// The URL spans are sent to (for HTTP, the full `/v1/traces` URL).
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: OtlpProtocol,
    /// Headers (gRPC metadata) sent with every export, e.g. credentials.
    pub headers: Vec<(String, String)>,
    /// The time one export may take.
    pub timeout: Duration,
    /// Which traces are recorded.
    pub sampler: SamplerSetting,
    /// `service.name` of the resource.
    pub service_name: String,
    /// The other resource attributes.
    pub resource: Vec<(String, String)>,
}

/// `OTEL_TRACES_SAMPLER` (and its argument).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerSetting {
    /// `always_on`.
    AlwaysOn,
    /// `always_off`.
    AlwaysOff,
    /// `traceidratio` with its ratio.
    TraceIdRatio(f64),
    /// `parentbased_always_on` (the default).
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio` with its ratio.
    ParentBasedTraceIdRatio(f64),
}

impl SamplerSetting {
    fn sampler(self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }
}

fn invalid(variable: &'static str, why: impl Into<String>) -> TelemetryError {
    TelemetryError::OtelSetting {
        variable,
        why: why.into(),
    }
}

/// The value of the first of `names` that is set and not blank.
fn first<'n>(env: &dyn Fn(&str) -> Option<String>, names: &[&'n str]) -> Option<(&'n str, String)> {
    names.iter().find_map(|name| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (*name, v))
    })
}

impl OtlpSettings {
    /// The settings `env` describes for the binary `service` (its default
    /// `service.name`), or `None` when traces are off: no endpoint,
    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    pub fn from_lookup(
        service: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TelemetryError> {
        let disabled =
            env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let exporter = env("OTEL_TRACES_EXPORTER").unwrap_or_default();
        let exporter = exporter.trim().to_ascii_lowercase();
        if disabled || exporter == "none" {
            return Ok(None);
        }
        if !exporter.is_empty() && exporter != "otlp" {
            return Err(invalid(
                "OTEL_TRACES_EXPORTER",
                format!("{exporter:?}: only otlp (or none) is supported"),
            ));
        }
        let protocol = match first(
            env,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ],
        ) {
            None => OtlpProtocol::HttpProtobuf,
            Some((_, p)) if p == "grpc" => OtlpProtocol::Grpc,
            Some((_, p)) if p == "http/protobuf" => OtlpProtocol::HttpProtobuf,
            Some((name, p)) => {
                return Err(invalid(name, format!("{p:?}: use grpc or http/protobuf")));
            }
        };
        let endpoint = if let Some((_, url)) = first(env, &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]) {
            url
        } else if let Some((_, base)) = first(env, &["OTEL_EXPORTER_OTLP_ENDPOINT"]) {
            match protocol {
                OtlpProtocol::Grpc => base,
                OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            }
        } else {
            return Ok(None);
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        }
        let mut headers = Vec::new();
        for name in [HEADERS_ENV, TRACES_HEADERS_ENV] {
            if let Some(list) = env(name) {
                // The traces-specific list comes last and so wins.
                for (key, value) in parse_pairs(&list).map_err(|why| invalid(name, why))? {
                    headers.retain(|(k, _): &(String, String)| !k.eq_ignore_ascii_case(&key));
                    headers.push((key.to_ascii_lowercase(), value));
                }
            }
        }
        let timeout = match first(
            env,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ],
        ) {
            None => Duration::from_secs(10),
            Some((_, ms)) => Duration::from_millis(ms.parse().map_err(|_| {
                invalid(
                    "OTEL_EXPORTER_OTLP_TIMEOUT",
                    format!("{ms:?} is not milliseconds"),
                )
            })?),
        };
        let sampler = parse_sampler(
            env("OTEL_TRACES_SAMPLER").as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?;
        let mut resource = match env("OTEL_RESOURCE_ATTRIBUTES") {
            Some(list) => {
                parse_pairs(&list).map_err(|why| invalid("OTEL_RESOURCE_ATTRIBUTES", why))?
            }
            None => Vec::new(),
        };
        let from_attributes = resource
            .iter()
            .position(|(k, _)| k == "service.name")
            .map(|at| resource.remove(at).1);
        let service_name = first(env, &[SERVICE_NAME_ENV])
            .map(|(_, v)| v)
            .or(from_attributes)
            .unwrap_or_else(|| service.to_owned());
        Ok(Some(Self {
            endpoint,
            protocol,
            headers,
            timeout,
            sampler,
            service_name,
            resource,
        }))
    }
}

/// Parses a W3C-baggage-like `key=value,key=value` list (OTLP headers,
/// resource attributes), percent-decoding the values.
fn parse_pairs(list: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("{item:?} is not key=value"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{item:?} has an empty key"));
        }
        pairs.push((key.to_owned(), percent_decode(value.trim())?));
    }
    Ok(pairs)
}

fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = value
                .get(at + 1..at + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{value:?} has a bad percent escape"))?;
            out.push(hex);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} decodes to invalid UTF-8"))
}

fn parse_sampler(name: Option<&str>, arg: Option<&str>) -> Result<SamplerSetting, TelemetryError> {
    let ratio = || -> Result<f64, TelemetryError> {
        let Some(arg) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
            return Ok(1.0);
        };
        arg.parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| {
                invalid(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("{arg:?} is not a ratio in [0, 1]"),
                )
            })
    };
    Ok(match name.map(str::trim).unwrap_or("") {
        "" | "parentbased_always_on" => SamplerSetting::ParentBasedAlwaysOn,
        "always_on" => SamplerSetting::AlwaysOn,
        "always_off" => SamplerSetting::AlwaysOff,
        "traceidratio" => SamplerSetting::TraceIdRatio(ratio()?),
        "parentbased_always_off" => SamplerSetting::ParentBasedAlwaysOff,
        "parentbased_traceidratio" => SamplerSetting::ParentBasedTraceIdRatio(ratio()?),
        other => {
            return Err(invalid(
                "OTEL_TRACES_SAMPLER",
                format!("{other:?} is not supported"),
            ));
        }
    })
}

/// The tracer provider exporting to `settings` in batches. Call it inside
/// the Tokio runtime: the gRPC channel runs on it.
pub fn tracer_provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = match settings.protocol {
        OtlpProtocol::Grpc => {
            let mut headers = http::HeaderMap::new();
            for (key, value) in &settings.headers {
                let name = http::HeaderName::from_bytes(key.as_bytes()).map_err(|_| {
                    invalid(HEADERS_ENV, format!("{key:?} is not a gRPC metadata key"))
                })?;
                let value = http::HeaderValue::from_str(value).map_err(|_| {
                    invalid(
                        HEADERS_ENV,
                        format!("the value of {key} is not visible ASCII"),
                    )
                })?;
                headers.append(name, value);
            }
            let metadata =
                opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(settings.timeout)
                .with_metadata(metadata);
            if settings.endpoint.starts_with("https://") {
                builder = builder.with_tls_config(
                    opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                        .with_native_roots(),
                );
            }
            builder.build()?
        }
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .with_headers(settings.headers.iter().cloned().collect::<HashMap<_, _>>())
            .build()?,
    };
    let resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attributes(
            settings
                .resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(settings.sampler.sampler())
        .with_resource(resource)
        .build())
}

/// The spans (and events within them) exported: Chaperone's own, at `info`
/// or above, whatever `RUST_LOG` says of logs. The exporter's own gRPC and
/// HTTP spans are never exported (they would feed themselves).
pub fn span_filter() -> FilterFn<fn(&tracing::Metadata<'_>) -> bool> {
    FilterFn::new(exported)
}

fn exported(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("chaperone") && *meta.level() <= tracing::Level::INFO
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<OtlpSettings>, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        OtlpSettings::from_lookup("chaperone-sidecar", &|name| vars.get(name).cloned())
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(settings(&[]).unwrap(), None);
        assert_eq!(
            settings(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap(),
            None
        );
    }

    #[test]
    fn off_when_disabled_even_with_an_endpoint() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            settings(&[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap(),
            None
        );
        assert_eq!(
            settings(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            None
        );
    }

    #[test]
    fn http_appends_the_traces_path_to_the_base_endpoint() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.service_name, "chaperone-sidecar");
        assert_eq!(s.sampler, SamplerSetting::ParentBasedAlwaysOn);
        assert_eq!(s.timeout, Duration::from_secs(10));
    }

    #[test]
    fn grpc_and_the_traces_endpoint_are_used_as_given() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.protocol, OtlpProtocol::Grpc);
        assert_eq!(s.endpoint, "http://traces:4317");
    }

    #[test]
    fn reads_headers_sampler_and_resource() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Bearer%20abc, x-tenant=a",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=b"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=gw,deployment.environment=prod",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            s.headers,
            vec![
                ("authorization".to_owned(), "Bearer abc".to_owned()),
                ("x-tenant".to_owned(), "b".to_owned())
            ]
        );
        assert_eq!(s.sampler, SamplerSetting::ParentBasedTraceIdRatio(0.25));
        assert_eq!(s.service_name, "gw");
        assert_eq!(
            s.resource,
            vec![("deployment.environment".to_owned(), "prod".to_owned())]
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn service_name_variable_wins() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SERVICE_NAME", "billing-gw"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=gw"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.service_name, "billing-gw");
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for bad in [
            [endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            [endpoint, ("OTEL_TRACES_SAMPLER", "jaeger_remote")],
            [endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
            [endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")],
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
                ("A", "b"),
            ],
        ] {
            assert!(settings(&bad).is_err(), "{bad:?}");
        }
        assert!(
            settings(&[
                endpoint,
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2")
            ])
            .is_err()
        );
    }
}
