//! Fuzz the edge's routes file parser (`tabbify_edge::routes::HostRoutes::parse`): any text
//! either parses or is refused with an error that names a line inside the text; a table that
//! parses holds one route per accepted line, rendering it back as a file parses to the same
//! routes, and every route's own host and prefix look up to its app.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_edge::routes::{RouteError, HostRoutes};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let table = match HostRoutes::parse(text) {
        Ok(table) => table,
        Err(RouteError::Invalid { line, .. }) => {
            assert!(line >= 1 && line <= text.lines().count().max(1), "line {line} out of range");
            return;
        }
        Err(other) => panic!("parse gave a non-parse error: {other}"),
    };
    let routes = table.routes();
    assert_eq!(routes.len(), table.len());
    let rendered: String = routes
        .iter()
        .map(|r| format!("{} {} {}\n", r.host, r.prefix, r.app))
        .collect();
    let again = HostRoutes::parse(&rendered).expect("a rendered table parses");
    assert_eq!(again.routes(), routes);
    for r in &routes {
        // The longest matching prefix may belong to another route of the same host only
        // if it is at least as long as this one.
        let found = table.lookup(&r.host, &r.prefix).expect("a route's own path matches");
        if found != r.app {
            assert!(routes
                .iter()
                .any(|o| o.host == r.host && o.app == found && o.prefix.len() >= r.prefix.len()));
        }
    }
});
