//! The `kerwen` binary: `serve` and `dev` run nodes; every other command is a client.

use clap::{Parser, Subcommand};

/// See the workspace `Cargo.toml`: the allocator is chosen for the nodes' hot paths.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use kerwen_node::cli::access::{AclCommand, CertsCommand, EvidenceCommand, GroupCommand, MemberCommand};
use kerwen_node::cli::{self, ClientOpts, ConsumeArgs, DlqCommand, DownloadArgs, MailboxCommand, PublishArgs};
use kerwen_node::config::ServeArgs;
use kerwen_node::dev::{self, DevArgs};
use kerwen_node::telemetry;

/// Kerwen: a Raft-replicated store-and-forward message broker for interagency data exchange.
#[derive(Debug, Parser)]
#[command(name = "kerwen", version, about)]
struct Cli {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Run a local 3-node development cluster in the foreground.
    Dev(DevArgs),
    /// Create, list and describe mailboxes.
    Mailbox {
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// Publish one message (payload from --data, --file or standard input). Files over 4 MiB
    /// are uploaded in chunks, resuming after failures.
    Publish(PublishArgs),
    /// Send a request to a provider's service and wait for its reply (asynchronous
    /// request/reply: the reply comes to one of the caller's own mailboxes).
    Request(kerwen_node::cli::request::RequestArgs),
    /// Answer the requests waiting in one of the caller's mailboxes, each with the same payload.
    Reply(kerwen_node::cli::request::ReplyArgs),
    /// Download the chunked payload of a delivered message to a file (resumes a partial file).
    Download(DownloadArgs),
    /// Consume (and ack) messages from a mailbox.
    Consume(ConsumeArgs),
    /// List and redrive a mailbox's dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Show nodes (state, replicas, leaders), Raft groups and their leaders, moves.
    Status,
    /// Add, drain and remove cluster nodes.
    Node {
        #[command(subcommand)]
        command: kerwen_node::cli::node::NodeCommand,
    },
    /// Operational monitoring: each node's records of the publishes, deliveries and acks it
    /// handled, and per-service health over the last 10 minutes.
    Opmon(kerwen_node::cli::opmon::OpmonArgs),
    /// Register subsystems and set their quotas.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Grant, revoke and list the right to send to a service.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Named groups of subsystems (grantees of `acl grant --to group:NAME`).
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// The services (mailboxes) a subsystem offers.
    Services { subsystem: String },
    /// The services the caller (or, for admins, --subsystem) may send to.
    AllowedServices {
        #[arg(long)]
        subsystem: Option<String>,
    },
    /// Show the identity the cluster sees for this client.
    Whoami,
    /// Issue certificates from a CA on disk (development and small deployments).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Evidence: the published signing keys.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
    /// The calling subsystem's payload encryption keys (`publish --seal` seals to them).
    Keys {
        #[command(subcommand)]
        command: kerwen_node::cli::keys::KeysCommand,
    },
    /// Put an exchange scenario's topology (systems, mailboxes, grants, sealing keys) on the
    /// cluster; `smev` is built in.
    Scenario {
        #[command(subcommand)]
        command: kerwen_node::cli::scenario::ScenarioCommand,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let telemetry = telemetry::init(match &cli.command {
        Command::Serve(_) => "info,openraft=warn",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Serve(args) => {
            match args.resolve() {
                Ok(config) => kerwen_node::server::serve(config, kerwen_node::server::shutdown_signal()).await,
                Err(e) => Err(e),
            }
        }
        Command::Dev(args) => dev::run(args).await,
        Command::Mailbox { command } => cli::mailbox(&cli.client, command).await,
        Command::Publish(args) => cli::publish(&cli.client, args).await,
        Command::Consume(args) => cli::consume(&cli.client, args).await,
        Command::Request(args) => cli::request::request(&cli.client, args).await,
        Command::Reply(args) => cli::request::reply(&cli.client, args).await,
        Command::Download(args) => cli::download(&cli.client, args).await,
        Command::Dlq { command } => cli::dlq(&cli.client, command).await,
        Command::Status => cli::status(&cli.client).await,
        Command::Node { command } => cli::node::node(&cli.client, command).await,
        Command::Opmon(args) => cli::opmon::opmon(&cli.client, args).await,
        Command::Member { command } => cli::access::member(&cli.client, command).await,
        Command::Acl { command } => cli::access::acl(&cli.client, command).await,
        Command::Group { command } => cli::access::group(&cli.client, command).await,
        Command::Services { subsystem } => cli::access::services(&cli.client, subsystem).await,
        Command::AllowedServices { subsystem } => cli::access::allowed_services(&cli.client, subsystem).await,
        Command::Whoami => cli::access::whoami(&cli.client).await,
        Command::Certs { command } => cli::access::certs(&cli.client, command),
        Command::Evidence { command } => cli::access::evidence(&cli.client, command).await,
        Command::Keys { command } => cli::keys::keys(&cli.client, command).await,
        Command::Scenario { command } => cli::scenario::scenario(&cli.client, command).await,
    };
    telemetry.shutdown().await;
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
