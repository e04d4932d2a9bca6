//! The reference shop: four bounded contexts (catalog, inventory, customers,
//! ordering) on diptych, with the order placement saga and five views.
//!
//! The domain knows nothing of HTTP or of a database: aggregates decide, the
//! saga reacts, projections keep views, and [`Shop`] wires them to whatever
//! [`EventStore`] and [`ViewStore`] it is given. Command and event names are a
//! contract (see DESIGN.md): clients send `RegisterProduct`, `PlaceOrder`… with
//! snake_case JSON bodies, and read the views `products`, `orders`,
//! `customer-orders`, `customers` and `sales-by-hour`.
//!
//! Money is integer cents everywhere; no float ever holds a price or a total.

pub mod catalog;
pub mod customers;
pub mod detail;
pub mod inventory;
pub mod ordering;
pub mod placement;
pub mod services;
pub mod views;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use diptych::http::{Application, ApplicationError, StateAt, StreamState};
use diptych::{
    Command, CommandContext, CommandError, CommandOutcome, EventStore, Handler, InvalidBody,
    ParsedCommand, RejectionCode, Repository, RunnerConfig, RunnerHandle, StreamId, ViewError,
    ViewStore,
};

use crate::catalog::{ChangePrice, Product, RegisterProduct, RenameProduct};
use crate::customers::{Customer, RegisterCustomer, UpdateCustomerAddress};
use crate::inventory::{AddStock, InventoryCommand, Stock};
use crate::ordering::{CancelOrder, Order, OrderCommand, OrderLine, PlaceOrder};
use crate::placement::{OrderPlacement, Targets};
use crate::services::Service;

/// Why the shop refused a command: a business rule, with a stable code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A field's value is not acceptable.
    #[error("`{field}` {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No product with that id.
    #[error("no product with that id")]
    ProductNotFound,
    /// A product with that id exists already.
    #[error("a product with that id exists already")]
    ProductExists,
    /// No customer with that id.
    #[error("no customer with that id")]
    CustomerNotFound,
    /// A customer with that id exists already.
    #[error("a customer with that id exists already")]
    CustomerExists,
    /// No order with that id.
    #[error("no order with that id")]
    OrderNotFound,
    /// An order with that id exists already.
    #[error("an order with that id exists already")]
    OrderExists,
    /// The order is rejected or cancelled already.
    #[error("the order can no longer be cancelled")]
    OrderNotCancellable,
    /// Not enough units available for a line.
    #[error("not enough units of `{product_id}` available: {available} left")]
    InsufficientStock {
        /// The product.
        product_id: String,
        /// How many are available.
        available: u64,
    },
}

impl Rejection {
    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        RejectionCode::code(self)
    }

    /// The field at fault, for a rejection of the input itself (not of a rule).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Rejection::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl RejectionCode for Rejection {
    fn code(&self) -> &'static str {
        match self {
            Rejection::Invalid { .. } => "invalid_field",
            Rejection::ProductNotFound => "product_not_found",
            Rejection::ProductExists => "product_exists",
            Rejection::CustomerNotFound => "customer_not_found",
            Rejection::CustomerExists => "customer_exists",
            Rejection::OrderNotFound => "order_not_found",
            Rejection::OrderExists => "order_exists",
            Rejection::OrderNotCancellable => "order_not_cancellable",
            Rejection::InsufficientStock { .. } => "insufficient_stock",
        }
    }

    /// A refusal of the input itself is a 400 naming the field; a rule's, a 422.
    fn status(&self) -> u16 {
        if self.field().is_some() { 400 } else { 422 }
    }

    fn field(&self) -> Option<&str> {
        Rejection::field(self)
    }
}

/// A command read from its JSON body, to run in this process with
/// [`Shop::execute`]: what the shop's own tests, seeding and load generators use
/// to match on typed [`Rejection`]s.
#[derive(Debug)]
pub struct ShopCommand(ParsedCommand);

/// A command that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// No command has that name.
    #[error("no command named `{0}`; the shop's commands are {names}", names = ShopCommand::NAMES.join(", "))]
    UnknownCommand(String),
    /// The body does not fit the command.
    #[error(transparent)]
    InvalidBody(#[from] InvalidBody),
}

impl ShopCommand {
    /// The commands' contract names, in the order the split services list them.
    pub const NAMES: [&'static str; 8] = [
        RegisterProduct::NAME,
        RenameProduct::NAME,
        ChangePrice::NAME,
        AddStock::NAME,
        RegisterCustomer::NAME,
        UpdateCustomerAddress::NAME,
        PlaceOrder::NAME,
        CancelOrder::NAME,
    ];

    /// Reads the command `name` from its JSON body, naming the field at fault.
    pub fn parse(name: &str, body: serde_json::Value) -> Result<Self, ParseError> {
        // Parsing needs no store: the shop's own registrations over an empty
        // in-memory one read every command exactly as the service does.
        static READER: LazyLock<diptych::Service> = LazyLock::new(|| {
            let store: Arc<dyn EventStore> = Arc::new(diptych::MemoryStore::new());
            application(&Repositories::on(&store), None, "shop")
        });
        match READER.parse(name, body) {
            Ok(parsed) => Ok(ShopCommand(parsed)),
            Err(diptych::ParseError::UnknownCommand { name, .. }) => {
                Err(ParseError::UnknownCommand(name))
            }
            Err(diptych::ParseError::InvalidBody(invalid)) => Err(invalid.into()),
        }
    }

    /// Its contract name.
    pub fn name(&self) -> &'static str {
        self.0.name()
    }
}

/// The shop on an event store and a view store.
pub struct Shop {
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    /// The catalog's products.
    pub products: Repository<Product>,
    /// Inventory's stock, one stream per product.
    pub stock: Repository<Stock>,
    /// Customers.
    pub customers: Repository<Customer>,
    /// Orders.
    pub orders: Repository<Order>,
    /// The one service this process is, when the shop runs split.
    service: Option<Service>,
    /// Its commands, states and handlers, as the HTTP layer and runners take them.
    application: diptych::Service,
}

/// The shop's view names, as clients read them.
pub const VIEWS: [&str; 5] = [
    "products",
    "orders",
    "customer-orders",
    "customers",
    "sales-by-hour",
];

impl Shop {
    /// The shop on these stores; call [`Shop::start`] to keep its views.
    pub fn new(store: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        Self::assemble(None, "shop", store, views)
    }

    /// The shop as the service `name`: one of the split shop's
    /// ([`Service::parse`]), or the whole shop under that name (the name its
    /// relay publishes under).
    pub fn named(name: &str, store: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        Self::assemble(Service::parse(name), name, store, views)
    }

    /// One service of the split shop on its own stores (see [`services`]).
    pub fn service(
        service: Service,
        store: Arc<dyn EventStore>,
        views: Arc<dyn ViewStore>,
    ) -> Self {
        Self::assemble(Some(service), service.name(), store, views)
    }

    fn assemble(
        service: Option<Service>,
        name: &str,
        store: Arc<dyn EventStore>,
        views: Arc<dyn ViewStore>,
    ) -> Self {
        let repositories = Repositories::on(&store);
        Self {
            application: application(&repositories, service, name),
            products: repositories.products,
            stock: repositories.stock,
            customers: repositories.customers,
            orders: repositories.orders,
            store,
            views,
            service,
        }
    }

    /// The service this process is, when the shop runs split.
    pub fn split_service(&self) -> Option<Service> {
        self.service
    }

    /// The shop as a diptych service: commands by name, states, handlers.
    pub fn application(&self) -> &diptych::Service {
        &self.application
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The view store.
    pub fn views(&self) -> &Arc<dyn ViewStore> {
        &self.views
    }

    /// What the shop runs on the log: the five projections and the order
    /// placement saga (those of this service, when split).
    pub fn handlers(&self) -> Vec<Handler> {
        self.application.handlers().to_vec()
    }

    /// Starts every handler in this process.
    pub async fn start(&self, config: RunnerConfig) -> Result<Vec<RunnerHandle>, ViewError> {
        let mut runners = Vec::new();
        for handler in self.handlers() {
            runners.push(
                handler
                    .spawn(self.store.clone(), self.views.clone(), config.clone())
                    .await?,
            );
        }
        Ok(runners)
    }

    /// Runs a command in this process, with the shop's typed rejections.
    ///
    /// # Panics
    ///
    /// On a split service, for another service's command.
    pub async fn execute(
        &self,
        command: ShopCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<Rejection>> {
        self.application.run_as(command.0, context).await
    }
}

#[async_trait::async_trait]
impl Application for Shop {
    fn commands(&self) -> Vec<&'static str> {
        self.application.commands()
    }

    fn taken_elsewhere(&self, command: &str) -> Option<String> {
        self.application.taken_elsewhere(command)
    }

    async fn execute(
        &self,
        name: &str,
        body: serde_json::Value,
        context: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError> {
        self.application.execute(name, body, context).await
    }

    async fn state(&self, stream: &StreamId, at: StateAt) -> Result<StreamState, ApplicationError> {
        self.application.state(stream, at).await
    }
}

/// The shop's four repositories, as the service's handlers hold them.
#[derive(Clone)]
struct Repositories {
    products: Repository<Product>,
    stock: Repository<Stock>,
    customers: Repository<Customer>,
    orders: Repository<Order>,
}

impl Repositories {
    fn on(store: &Arc<dyn EventStore>) -> Self {
        Self {
            products: Repository::new(store.clone()),
            stock: Repository::new(store.clone()),
            customers: Repository::new(store.clone()),
            orders: Repository::new(store.clone()),
        }
    }
}

/// The shop's commands, states and handlers; when split, only those of one
/// service, which names the owner of every other command.
///
/// Only `orders` may be partitioned: each order's document is written by that
/// order's events alone, while the other views gather several streams into one
/// document (a product's stock, a customer's totals, renamed products in order
/// lines, hourly sales).
fn application(r: &Repositories, split: Option<Service>, name: &str) -> diptych::Service {
    let adding = r.clone();
    let placing = r.clone();
    let mut builder = diptych::Service::builder(name)
        .aggregate(r.products.clone())
        .aggregate(r.stock.clone())
        .aggregate(r.customers.clone())
        .aggregate(r.orders.clone())
        .command::<RegisterProduct>()
        .command::<RenameProduct>()
        .command::<ChangePrice>()
        .command_with(move |add: AddStock, context: CommandContext| {
            let r = adding.clone();
            async move { add_stock(&r.products, &r.stock, add, &context).await }
        })
        .command::<RegisterCustomer>()
        .command::<UpdateCustomerAddress>()
        .command_with(move |place: PlaceOrder, context: CommandContext| {
            let r = placing.clone();
            async move {
                place_order(
                    &r.customers,
                    &r.products,
                    &r.stock,
                    &r.orders,
                    place,
                    &context,
                )
                .await
            }
        })
        .command::<CancelOrder>();
    if let Some(split) = split {
        for name in ShopCommand::NAMES {
            if let Some(owner) = Service::of_command(name).filter(|owner| *owner != split) {
                builder = builder.taken_by(name, owner.name());
            }
        }
        for source in split.sources() {
            builder = builder.copies(source.name(), [source.category()]);
        }
    }
    let serves = |view: &str| split.is_none_or(|split| split.views().contains(&view));
    let projections: [(Arc<dyn diptych::Projection>, bool); 5] = [
        (Arc::new(views::ProductsView::default()), false),
        (Arc::new(views::OrdersView::default()), true),
        (Arc::new(views::CustomerOrdersView::default()), false),
        (Arc::new(views::CustomersView::default()), false),
        (Arc::new(views::SalesByHourView::default()), false),
    ];
    for (projection, partitionable) in projections {
        if !serves(projection.name()) {
            continue;
        }
        builder = if partitionable {
            builder.partitioned_projection(projection)
        } else {
            builder.projection(projection)
        };
    }
    let targets = match split {
        None => Some(Targets::All),
        Some(Service::Inventory) => Some(Targets::Stock),
        Some(Service::Ordering) => Some(Targets::Orders),
        Some(_) => None,
    };
    if let Some(targets) = targets {
        let saga = OrderPlacement::new(r.stock.clone(), r.orders.clone()).sending_only(targets);
        builder = builder.process_manager(Arc::new(saga));
    }
    builder
        .build()
        .expect("the shop's commands, aggregates and handlers are each registered once")
}

/// Adds stock to a product the catalog knows.
async fn add_stock(
    products: &Repository<Product>,
    stock: &Repository<Stock>,
    add: AddStock,
    context: &CommandContext,
) -> Result<CommandOutcome, CommandError<Rejection>> {
    // The service checked the id is not blank.
    let id = add.product_id.clone();
    if !products.load(&id).await?.state.exists {
        return Err(CommandError::Rejected(Rejection::ProductNotFound));
    }
    stock
        .execute(&id, &InventoryCommand::Add(add), context)
        .await
}

/// Prices the lines from the catalog (merging lines of the same product),
/// refuses unknown customers and products and lines clearly out of stock,
/// then places the order; the saga reserves the stock for real.
async fn place_order(
    customers: &Repository<Customer>,
    products: &Repository<Product>,
    stock: &Repository<Stock>,
    orders: &Repository<Order>,
    place: PlaceOrder,
    context: &CommandContext,
) -> Result<CommandOutcome, CommandError<Rejection>> {
    // The service checked the id is not blank.
    let order_id = place.order_id.clone();
    let customer_id = required("customer_id", &place.customer_id)?;
    if !customers.load(&customer_id).await?.state.exists {
        return Err(CommandError::Rejected(Rejection::CustomerNotFound));
    }
    let mut quantities: BTreeMap<String, u64> = BTreeMap::new();
    for line in &place.lines {
        let id = required("lines.product_id", &line.product_id)?;
        let total = quantities.entry(id).or_default();
        *total = total.saturating_add(line.quantity);
    }
    let mut lines = Vec::with_capacity(quantities.len());
    for (product_id, quantity) in quantities {
        let product = products.load(&product_id).await?.state;
        if !product.exists {
            return Err(CommandError::Rejected(Rejection::ProductNotFound));
        }
        let available = stock.load(&product_id).await?.state.available();
        if quantity > available {
            return Err(CommandError::Rejected(Rejection::InsufficientStock {
                product_id,
                available,
            }));
        }
        lines.push(OrderLine {
            product_id,
            name: product.name,
            quantity,
            price_cents: product.price_cents,
        });
    }
    let command = OrderCommand::Place {
        order_id: order_id.clone(),
        customer_id,
        lines,
    };
    orders.execute(&order_id, &command, context).await
}

/// An id that must not be empty.
fn required(field: &'static str, value: &str) -> Result<String, CommandError<Rejection>> {
    if value.trim().is_empty() {
        return Err(CommandError::Rejected(Rejection::Invalid {
            field,
            reason: "must not be empty",
        }));
    }
    Ok(value.to_owned())
}
