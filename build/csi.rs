//! tonic service code for the CSI plugin (owned by `src/csi/`): the `csi.v1.Identity` and
//! `csi.v1.Node` services, described here method by method (no .proto file, no protoc); the
//! messages are hand-written prost structs in `src/csi/proto.rs`, field numbers as in the CSI
//! specification. Controller RPCs are ceph-csi's.

use tonic_build::manual::{Builder, Method, Service};

fn method(name: &str, route: &str, req: &str, resp: &str) -> Method {
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type(format!("crate::csi::proto::{req}"))
        .output_type(format!("crate::csi::proto::{resp}"))
        .codec_path("tonic::codec::ProstCodec")
        .build()
}

fn service(name: &str, methods: &[(&str, &str)]) -> Service {
    let mut b = Service::builder().name(name).package("csi.v1");
    for (snake, route) in methods {
        b = b.method(method(
            snake,
            route,
            &format!("{route}Request"),
            &format!("{route}Response"),
        ));
    }
    b.build()
}

pub fn generate() {
    println!("cargo:rerun-if-changed=build/csi.rs");
    let identity = service(
        "Identity",
        &[
            ("get_plugin_info", "GetPluginInfo"),
            ("get_plugin_capabilities", "GetPluginCapabilities"),
            ("probe", "Probe"),
        ],
    );
    let node = service(
        "Node",
        &[
            ("node_stage_volume", "NodeStageVolume"),
            ("node_unstage_volume", "NodeUnstageVolume"),
            ("node_publish_volume", "NodePublishVolume"),
            ("node_unpublish_volume", "NodeUnpublishVolume"),
            ("node_get_volume_stats", "NodeGetVolumeStats"),
            ("node_expand_volume", "NodeExpandVolume"),
            ("node_get_capabilities", "NodeGetCapabilities"),
            ("node_get_info", "NodeGetInfo"),
        ],
    );
    Builder::new()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .compile(&[identity, node]);
}
