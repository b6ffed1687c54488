//! `chaperone_build_info{version, component} 1`: the build each binary
//! reports on `/metrics`, defined once for the controller and the sidecar
//! (both depend on this crate) so a dashboard can tell which versions run
//! side by side.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The release of this build (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The metric's full name; registered without a prefix.
pub const BUILD_INFO_METRIC: &str = "chaperone_build_info";

/// Labels of `chaperone_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfoLabels {
    /// [`VERSION`].
    pub version: &'static str,
    /// `controller` or `sidecar`.
    pub component: &'static str,
}

/// Registers `chaperone_build_info{version, component} 1` in `registry`,
/// which must have no prefix (the name is the same for every component).
pub fn register_build_info(registry: &mut Registry, component: &'static str) {
    let info = Family::<BuildInfoLabels, Gauge>::default();
    info.get_or_create(&BuildInfoLabels {
        version: VERSION,
        component,
    })
    .set(1);
    registry.register(
        BUILD_INFO_METRIC,
        "The running build: always 1, labelled with the version and the component",
        info,
    );
}
