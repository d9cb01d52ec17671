//! `airllm serve`: the flags of the OpenAI-compatible server; [`crate::serve`] is the server.

use anyhow::{bail, Context, Result};

use crate::args::{prepare, start, ServeArgs};

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let o = a.model.session_options(Some(&a.spec))?;
    let prep = prepare(&a.model, &o)?;
    // A hub model is named by its repo spec, not by its snapshot's commit folder.
    let from_hub =
        a.model.model.as_deref().filter(|m| {
            airllm::hub::RepoSpec::parse(m).is_some() && !std::path::Path::new(m).exists()
        });
    let model_id = a
        .alias
        .clone()
        .or(from_hub.map(str::to_string))
        .unwrap_or_else(|| {
            let p = &prep.info.dir;
            p.file_stem()
                .or(p.file_name())
                .map_or("model".into(), |s| s.to_string_lossy().into_owned())
        });
    let session = start(prep, &a.model.workload(None, a.parallel, None))?;
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("AIRLLM_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let host: std::net::IpAddr = a
        .host
        .parse()
        .with_context(|| format!("--host {}: expected an IP address", a.host))?;
    if !host.is_loopback() && api_key.is_none() {
        eprintln!("serve: listening beyond this machine without an API key (--api-key)");
    }
    let cfg = crate::serve::Config {
        model_id,
        api_key,
        queue: a.queue,
    };
    crate::serve::serve(session, cfg, std::net::SocketAddr::new(host, a.port))
}
