//! Prints Eden's CustomResourceDefinitions as YAML: `cargo run --bin crdgen > crds/eden.yaml`.

fn main() {
    match eden_operator::crd::all_crds_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(err) => {
            eprintln!("crdgen: {err}");
            std::process::exit(1);
        }
    }
}
