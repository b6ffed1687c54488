//! `chaperone-testenv`: runs the local control plane for the demo and for manual
//! exploration: writes a kubeconfig, prints `ready`, and stops everything on
//! Ctrl-C, SIGTERM or when its standard input closes.

#![forbid(unsafe_code)]

use std::{io::Read, path::PathBuf};

use anyhow::{Context, Result, bail};
use chaperone_testenv::ControlPlane;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let kubeconfig = match (args.next().as_deref(), args.next()) {
        (Some("up"), Some(flag)) if flag == "--kubeconfig" => {
            PathBuf::from(args.next().context("--kubeconfig needs a path")?)
        }
        _ => bail!("usage: chaperone-testenv up --kubeconfig PATH"),
    };
    eprintln!("starting etcd and kube-apiserver …");
    let cp = ControlPlane::start()?;
    if let Some(dir) = kubeconfig.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(cp.kubeconfig(), &kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    println!(
        "ready: {} (kubeconfig {})",
        cp.server(),
        kubeconfig.display()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = [0u8; 64];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        });
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = stdin_closed => {}
        }
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_file(&kubeconfig);
    eprintln!("stopping the control plane");
    drop(cp);
    Ok(())
}
