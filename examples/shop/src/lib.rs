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
pub mod service;
pub mod services;
pub mod views;

use std::collections::BTreeMap;
use std::sync::Arc;

use diptych::{
    CommandContext, CommandError, CommandOutcome, EventStore, Handler, HandlerKind, Repository,
    RunnerConfig, RunnerHandle, ViewError, ViewStore, as_projection,
};

use crate::catalog::{CatalogCommand, ChangePrice, Product, RegisterProduct, RenameProduct};
use crate::customers::{Customer, CustomerCommand, RegisterCustomer, UpdateCustomerAddress};
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

    /// The field at fault, for a rejection of the input itself (not of a rule).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Rejection::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Every command a client can send, by its contract name.
#[derive(Clone, Debug, PartialEq)]
pub enum ShopCommand {
    /// `RegisterProduct`.
    RegisterProduct(RegisterProduct),
    /// `RenameProduct`.
    RenameProduct(RenameProduct),
    /// `ChangePrice`.
    ChangePrice(ChangePrice),
    /// `AddStock`.
    AddStock(AddStock),
    /// `RegisterCustomer`.
    RegisterCustomer(RegisterCustomer),
    /// `UpdateCustomerAddress`.
    UpdateCustomerAddress(UpdateCustomerAddress),
    /// `PlaceOrder`.
    PlaceOrder(PlaceOrder),
    /// `CancelOrder`.
    CancelOrder(CancelOrder),
}

/// A command that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// No command has that name.
    #[error("no command named `{0}`; the shop's commands are {names}", names = ShopCommand::NAMES.join(", "))]
    UnknownCommand(String),
    /// The body does not fit the command.
    #[error("the body of `{command}` does not fit it: {reason}")]
    InvalidBody {
        /// The command.
        command: &'static str,
        /// The field at fault (`lines[0].quantity`), when one is.
        field: Option<String>,
        /// What is wrong.
        reason: String,
    },
}

impl ShopCommand {
    /// The commands' contract names.
    pub const NAMES: [&'static str; 8] = [
        "RegisterProduct",
        "RenameProduct",
        "ChangePrice",
        "AddStock",
        "RegisterCustomer",
        "UpdateCustomerAddress",
        "PlaceOrder",
        "CancelOrder",
    ];

    /// Reads the command `name` from its JSON body.
    pub fn parse(name: &str, body: serde_json::Value) -> Result<Self, ParseError> {
        fn read<T: serde::de::DeserializeOwned>(
            command: &'static str,
            body: serde_json::Value,
        ) -> Result<T, ParseError> {
            serde_path_to_error::deserialize(body).map_err(|error| {
                let path = error.path().to_string();
                let reason = error.inner().to_string();
                // serde names a missing or unknown field in its message, between
                // backquotes; a missing one is reported at its parent's path.
                let named = reason
                    .split('`')
                    .nth(1)
                    .filter(|_| reason.contains("field `"))
                    .map(|name| match path.as_str() {
                        "." => name.to_owned(),
                        // An unknown field's path already ends with it.
                        path if path.ends_with(name) => path.to_owned(),
                        parent => format!("{parent}.{name}"),
                    });
                let field = named.or_else(|| (path != ".").then_some(path));
                ParseError::InvalidBody {
                    command,
                    field,
                    reason,
                }
            })
        }
        Ok(match name {
            "RegisterProduct" => ShopCommand::RegisterProduct(read(Self::NAMES[0], body)?),
            "RenameProduct" => ShopCommand::RenameProduct(read(Self::NAMES[1], body)?),
            "ChangePrice" => ShopCommand::ChangePrice(read(Self::NAMES[2], body)?),
            "AddStock" => ShopCommand::AddStock(read(Self::NAMES[3], body)?),
            "RegisterCustomer" => ShopCommand::RegisterCustomer(read(Self::NAMES[4], body)?),
            "UpdateCustomerAddress" => {
                ShopCommand::UpdateCustomerAddress(read(Self::NAMES[5], body)?)
            }
            "PlaceOrder" => ShopCommand::PlaceOrder(read(Self::NAMES[6], body)?),
            "CancelOrder" => ShopCommand::CancelOrder(read(Self::NAMES[7], body)?),
            other => return Err(ParseError::UnknownCommand(other.to_owned())),
        })
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
        Self {
            products: Repository::new(store.clone()),
            stock: Repository::new(store.clone()),
            customers: Repository::new(store.clone()),
            orders: Repository::new(store.clone()),
            store,
            views,
            service: None,
        }
    }

    /// One service of the split shop on its own stores (see [`services`]).
    pub fn service(
        service: Service,
        store: Arc<dyn EventStore>,
        views: Arc<dyn ViewStore>,
    ) -> Self {
        Self {
            service: Some(service),
            ..Self::new(store, views)
        }
    }

    /// The service this process is, when the shop runs split.
    pub fn split_service(&self) -> Option<Service> {
        self.service
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
    /// placement saga. Only `orders` may be partitioned: each order's document is
    /// written by that order's events alone, while the other views gather
    /// several streams into one document (a product's stock, a customer's
    /// totals, renamed products in order lines, hourly sales).
    pub fn handlers(&self) -> Vec<Handler> {
        let projection = |projection: Arc<dyn diptych::Projection>, partitionable| Handler {
            projection,
            kind: HandlerKind::Projection,
            partitionable,
        };
        let serves = |view: &str| {
            self.service
                .is_none_or(|service| service.views().contains(&view))
        };
        let mut handlers: Vec<Handler> = [
            projection(Arc::new(views::ProductsView), false),
            projection(Arc::new(views::OrdersView), true),
            projection(Arc::new(views::CustomerOrdersView), false),
            projection(Arc::new(views::CustomersView), false),
            projection(Arc::new(views::SalesByHourView), false),
        ]
        .into_iter()
        .filter(|handler| serves(handler.projection.name()))
        .collect();
        let targets = match self.service {
            None => Some(Targets::All),
            Some(Service::Inventory) => Some(Targets::Stock),
            Some(Service::Ordering) => Some(Targets::Orders),
            Some(_) => None,
        };
        if let Some(targets) = targets {
            let saga =
                OrderPlacement::new(self.stock.clone(), self.orders.clone()).sending_only(targets);
            handlers.push(Handler {
                projection: as_projection(Arc::new(saga)),
                kind: HandlerKind::ProcessManager,
                partitionable: false,
            });
        }
        handlers
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

    /// Runs a command.
    pub async fn execute(
        &self,
        command: ShopCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<Rejection>> {
        match command {
            ShopCommand::RegisterProduct(register) => {
                let id = required("product_id", &register.product_id)?;
                let command = CatalogCommand::Register(register);
                self.products.execute(&id, &command, context).await
            }
            ShopCommand::RenameProduct(rename) => {
                let id = required("product_id", &rename.product_id)?;
                let command = CatalogCommand::Rename(rename);
                self.products.execute(&id, &command, context).await
            }
            ShopCommand::ChangePrice(change) => {
                let id = required("product_id", &change.product_id)?;
                let command = CatalogCommand::ChangePrice(change);
                self.products.execute(&id, &command, context).await
            }
            ShopCommand::AddStock(add) => {
                let id = required("product_id", &add.product_id)?;
                if !self.products.load(&id).await?.state.exists {
                    return Err(CommandError::Rejected(Rejection::ProductNotFound));
                }
                self.stock
                    .execute(&id, &InventoryCommand::Add(add), context)
                    .await
            }
            ShopCommand::RegisterCustomer(register) => {
                let id = required("customer_id", &register.customer_id)?;
                let command = CustomerCommand::Register(register);
                self.customers.execute(&id, &command, context).await
            }
            ShopCommand::UpdateCustomerAddress(update) => {
                let id = required("customer_id", &update.customer_id)?;
                let command = CustomerCommand::UpdateAddress(update);
                self.customers.execute(&id, &command, context).await
            }
            ShopCommand::PlaceOrder(place) => self.place_order(place, context).await,
            ShopCommand::CancelOrder(cancel) => {
                let id = required("order_id", &cancel.order_id)?;
                self.orders
                    .execute(&id, &OrderCommand::Cancel, context)
                    .await
            }
        }
    }

    /// Prices the lines from the catalog (merging lines of the same product),
    /// refuses unknown customers and products and lines clearly out of stock,
    /// then places the order; the saga reserves the stock for real.
    async fn place_order(
        &self,
        place: PlaceOrder,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<Rejection>> {
        let order_id = required("order_id", &place.order_id)?;
        let customer_id = required("customer_id", &place.customer_id)?;
        if !self.customers.load(&customer_id).await?.state.exists {
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
            let product = self.products.load(&product_id).await?.state;
            if !product.exists {
                return Err(CommandError::Rejected(Rejection::ProductNotFound));
            }
            let available = self.stock.load(&product_id).await?.state.available();
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
        self.orders.execute(&order_id, &command, context).await
    }
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
