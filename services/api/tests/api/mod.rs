/// Runs a test body once with direct connections and once through PgBouncer.
macro_rules! both_paths {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn direct() {
                    super::$name(turnpike_testkit::Paths::DIRECT).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn pgbouncer() {
                    super::$name(turnpike_testkit::Paths::PGBOUNCER).await;
                }
            }
        )*
    };
}

mod agent;
mod cache;
mod chart;
mod chat_provider;
mod clients;
mod conversations;
mod dashboards;
mod failover;
mod faults;
mod fuzz;
mod idempotency;
mod isolation;
mod limits;
mod migrations;
mod openapi;
mod overload;
mod processes;
mod providers;
mod routing;
mod sdk;
mod surface;
mod traces;
mod turns;
mod validation;
mod web;
