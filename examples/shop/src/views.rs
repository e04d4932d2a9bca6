//! The shop's five views, each kept by its own projection.
//!
//! | view | key | answers |
//! |---|---|---|
//! | `products` | product id | listing and search by name/description, price, stock |
//! | `orders` | order id | one order with its lines, names, total and status |
//! | `customer-orders` | order id | a customer's history (`customer_id`, newest first by `placed_at_us`), names following renames |
//! | `customers` | customer id | profile, confirmed order count, lifetime value |
//! | `sales-by-hour` | `<hour>/<product id>` | units and revenue per product per hour |

use async_trait::async_trait;
use diptych::{
    CollectionSpec, EventSet, HandlerError, RecordedEvent, Timestamp, TypedProjection, ViewTx,
};
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogEvent, Product};
use crate::customers::{Customer, CustomerEvent};
use crate::inventory::{InventoryEvent, Stock};
use crate::ordering::{Order, OrderEvent, OrderLine, OrderStatus};

/// Any of the shop's events, as its views receive them.
pub enum ShopEvent {
    /// A product's.
    Catalog(CatalogEvent),
    /// A product's stock.
    Inventory(InventoryEvent),
    /// A customer's.
    Customer(CustomerEvent),
    /// An order's.
    Order(OrderEvent),
}

/// One document of `products`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProductDocument {
    /// The product.
    pub product_id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its price, in cents.
    pub price_cents: u64,
    /// Units in the warehouse, reserved or not.
    pub stock_on_hand: u64,
    /// Units that can still be ordered.
    pub stock_available: u64,
}

/// Keeps `products`.
pub struct ProductsView {
    events: EventSet<ShopEvent>,
}

impl Default for ProductsView {
    fn default() -> Self {
        let events = EventSet::new()
            .aggregate::<Product>(ShopEvent::Catalog)
            .aggregate::<Stock>(ShopEvent::Inventory);
        Self { events }
    }
}

#[async_trait]
impl TypedProjection for ProductsView {
    fn name(&self) -> &str {
        "products"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("products")
                .index("price_cents")
                .index("stock_available")
                .text("name")
                .text("description"),
        ]
    }

    type Event = ShopEvent;

    fn events(&self) -> &EventSet<ShopEvent> {
        &self.events
    }

    async fn apply(
        &self,
        typed: ShopEvent,
        _: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        match typed {
            ShopEvent::Catalog(CatalogEvent::ProductAdded {
                product_id,
                name,
                description,
                price_cents,
            }) => {
                update_product(views, &product_id, |product| {
                    product.name = name;
                    product.description = description;
                    product.price_cents = price_cents;
                })
                .await
            }
            ShopEvent::Catalog(CatalogEvent::ProductRenamed { product_id, name }) => {
                update_product(views, &product_id, |product| product.name = name).await
            }
            ShopEvent::Catalog(CatalogEvent::PriceChanged {
                product_id,
                price_cents,
            }) => {
                update_product(views, &product_id, |product| {
                    product.price_cents = price_cents;
                })
                .await
            }
            ShopEvent::Inventory(InventoryEvent::StockAdded {
                product_id,
                quantity,
            }) => {
                update_product(views, &product_id, |product| {
                    product.stock_on_hand += quantity;
                    product.stock_available += quantity;
                })
                .await
            }
            ShopEvent::Inventory(InventoryEvent::StockReserved {
                product_id,
                quantity,
                ..
            }) => {
                update_product(views, &product_id, |product| {
                    product.stock_available = product.stock_available.saturating_sub(quantity);
                })
                .await
            }
            ShopEvent::Inventory(InventoryEvent::StockReleased {
                product_id,
                quantity,
                ..
            }) => {
                update_product(views, &product_id, |product| {
                    product.stock_available += quantity;
                })
                .await
            }
            _ => Ok(()),
        }
    }
}

async fn update_product(
    views: &mut ViewTx,
    product_id: &str,
    change: impl FnOnce(&mut ProductDocument),
) -> Result<(), HandlerError> {
    views
        .upsert("products", product_id, |product: &mut ProductDocument| {
            product.product_id = product_id.to_owned();
            change(product);
        })
        .await?;
    Ok(())
}

/// One line of an order document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LineDocument {
    /// The product.
    pub product_id: String,
    /// Its name.
    pub name: String,
    /// How many units.
    pub quantity: u64,
    /// The unit price, in cents.
    pub price_cents: u64,
    /// Quantity times unit price, in cents.
    pub total_cents: u64,
}

impl From<&OrderLine> for LineDocument {
    fn from(line: &OrderLine) -> Self {
        Self {
            product_id: line.product_id.clone(),
            name: line.name.clone(),
            quantity: line.quantity,
            price_cents: line.price_cents,
            total_cents: line.total_cents(),
        }
    }
}

/// One document of `orders` and of `customer-orders`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OrderDocument {
    /// The order.
    pub order_id: String,
    /// The customer.
    pub customer_id: String,
    /// Where it stands.
    pub status: OrderStatus,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its lines.
    pub lines: Vec<LineDocument>,
    /// Its total, in cents.
    pub total_cents: u64,
    /// When it was placed (RFC 3339).
    pub placed_at: String,
    /// When it was placed, in microseconds since the epoch (for ordering).
    pub placed_at_us: i64,
}

/// Applies an order's own events to its document in `collection`.
async fn apply_order_event(
    collection: &str,
    event: &RecordedEvent,
    order_event: &OrderEvent,
    views: &mut ViewTx,
) -> Result<(), HandlerError> {
    match order_event {
        OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            lines,
            total_cents,
        } => {
            let document = OrderDocument {
                order_id: order_id.clone(),
                customer_id: customer_id.clone(),
                status: OrderStatus::Placed,
                reason: None,
                lines: lines.iter().map(LineDocument::from).collect(),
                total_cents: *total_cents,
                placed_at: event.recorded_at.to_string(),
                placed_at_us: event.recorded_at.as_unix_micros(),
            };
            views.put(collection, order_id, &document)?;
        }
        OrderEvent::OrderConfirmed { order_id, .. } => {
            views
                .update(collection, order_id, |order: &mut OrderDocument| {
                    order.status = OrderStatus::Confirmed;
                })
                .await?;
        }
        OrderEvent::OrderRejected {
            order_id, reason, ..
        } => {
            views
                .update(collection, order_id, |order: &mut OrderDocument| {
                    order.status = OrderStatus::Rejected;
                    order.reason = Some(reason.clone());
                })
                .await?;
        }
        OrderEvent::OrderCancelled { order_id, .. } => {
            views
                .update(collection, order_id, |order: &mut OrderDocument| {
                    order.status = OrderStatus::Cancelled;
                })
                .await?;
        }
    }
    Ok(())
}

/// Keeps `orders`.
pub struct OrdersView {
    events: EventSet<ShopEvent>,
}

impl Default for OrdersView {
    fn default() -> Self {
        let events = EventSet::new().aggregate::<Order>(ShopEvent::Order);
        Self { events }
    }
}

#[async_trait]
impl TypedProjection for OrdersView {
    fn name(&self) -> &str {
        "orders"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("orders")
                .index("customer_id")
                .index("status")
                .index("placed_at_us"),
        ]
    }

    type Event = ShopEvent;

    fn events(&self) -> &EventSet<ShopEvent> {
        &self.events
    }

    async fn apply(
        &self,
        typed: ShopEvent,
        event: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        if let ShopEvent::Order(order_event) = typed {
            apply_order_event("orders", event, &order_event, views).await?;
        }
        Ok(())
    }
}

/// Which orders hold a product, so a rename reaches them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct OrdersOfProduct {
    order_ids: Vec<String>,
}

/// Keeps `customer-orders`: every order, indexed by customer and time, with
/// product names that follow renames (through `customer-orders-by-product`).
pub struct CustomerOrdersView {
    events: EventSet<ShopEvent>,
}

impl Default for CustomerOrdersView {
    fn default() -> Self {
        let events = EventSet::new()
            .aggregate::<Order>(ShopEvent::Order)
            .aggregate::<Product>(ShopEvent::Catalog);
        Self { events }
    }
}

#[async_trait]
impl TypedProjection for CustomerOrdersView {
    fn name(&self) -> &str {
        "customer-orders"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("customer-orders")
                .index("customer_id")
                .index("placed_at_us")
                .index("status"),
            CollectionSpec::new("customer-orders-by-product"),
        ]
    }

    type Event = ShopEvent;

    fn events(&self) -> &EventSet<ShopEvent> {
        &self.events
    }

    async fn apply(
        &self,
        typed: ShopEvent,
        event: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        match typed {
            ShopEvent::Order(order_event) => {
                if let OrderEvent::OrderPlaced {
                    order_id, lines, ..
                } = &order_event
                {
                    for line in lines {
                        views
                            .upsert(
                                "customer-orders-by-product",
                                &line.product_id,
                                |index: &mut OrdersOfProduct| {
                                    index.order_ids.push(order_id.clone())
                                },
                            )
                            .await?;
                    }
                }
                apply_order_event("customer-orders", event, &order_event, views).await?;
            }
            ShopEvent::Catalog(CatalogEvent::ProductRenamed { product_id, name }) => {
                let orders: Option<OrdersOfProduct> =
                    views.get("customer-orders-by-product", &product_id).await?;
                for order_id in orders.map(|orders| orders.order_ids).unwrap_or_default() {
                    views
                        .update("customer-orders", &order_id, |order: &mut OrderDocument| {
                            for line in &mut order.lines {
                                if line.product_id == product_id {
                                    line.name.clone_from(&name);
                                }
                            }
                        })
                        .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// One document of `customers`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerDocument {
    /// The customer.
    pub customer_id: String,
    /// Their name.
    pub name: String,
    /// Their email address.
    pub email: String,
    /// Their postal address.
    pub address: String,
    /// Confirmed orders, not counting cancelled ones.
    pub order_count: u64,
    /// The total of those orders, in cents.
    pub lifetime_value_cents: u64,
}

/// Keeps `customers`.
pub struct CustomersView {
    events: EventSet<ShopEvent>,
}

impl Default for CustomersView {
    fn default() -> Self {
        let events = EventSet::new()
            .aggregate::<Customer>(ShopEvent::Customer)
            .aggregate::<Order>(ShopEvent::Order);
        Self { events }
    }
}

#[async_trait]
impl TypedProjection for CustomersView {
    fn name(&self) -> &str {
        "customers"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("customers")
                .index("email")
                .index("lifetime_value_cents")
                .text("name"),
        ]
    }

    type Event = ShopEvent;

    fn events(&self) -> &EventSet<ShopEvent> {
        &self.events
    }

    async fn apply(
        &self,
        typed: ShopEvent,
        _: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        match typed {
            ShopEvent::Customer(CustomerEvent::CustomerRegistered {
                customer_id,
                name,
                email,
                address,
            }) => {
                views
                    .upsert(
                        "customers",
                        &customer_id,
                        |document: &mut CustomerDocument| {
                            document.customer_id = customer_id.clone();
                            document.name = name;
                            document.email = email;
                            document.address = address;
                        },
                    )
                    .await?;
            }
            ShopEvent::Customer(CustomerEvent::CustomerAddressUpdated {
                customer_id,
                address,
            }) => {
                views
                    .update(
                        "customers",
                        &customer_id,
                        |document: &mut CustomerDocument| {
                            document.address = address;
                        },
                    )
                    .await?;
            }
            ShopEvent::Order(OrderEvent::OrderConfirmed {
                customer_id,
                total_cents,
                ..
            }) => {
                views
                    .update(
                        "customers",
                        &customer_id,
                        |document: &mut CustomerDocument| {
                            document.order_count += 1;
                            document.lifetime_value_cents += total_cents;
                        },
                    )
                    .await?;
            }
            ShopEvent::Order(OrderEvent::OrderCancelled {
                customer_id,
                was_confirmed: true,
                total_cents,
                ..
            }) => {
                views
                    .update(
                        "customers",
                        &customer_id,
                        |document: &mut CustomerDocument| {
                            document.order_count = document.order_count.saturating_sub(1);
                            document.lifetime_value_cents =
                                document.lifetime_value_cents.saturating_sub(total_cents);
                        },
                    )
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One document of `sales-by-hour`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SalesDocument {
    /// The hour, as `2026-11-22T10:00:00Z`.
    pub hour: String,
    /// The product.
    pub product_id: String,
    /// Units sold (confirmed, less those cancelled later).
    pub units: u64,
    /// Revenue, in cents.
    pub revenue_cents: u64,
}

/// What `sales-by-hour` remembers of an order until it is confirmed, and of the
/// hour it was counted in afterwards (so a cancellation is taken off that hour).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct PendingSale {
    lines: Vec<LineDocument>,
    counted_in: Option<String>,
}

/// Keeps `sales-by-hour`.
pub struct SalesByHourView {
    events: EventSet<ShopEvent>,
}

impl Default for SalesByHourView {
    fn default() -> Self {
        let events = EventSet::new().aggregate::<Order>(ShopEvent::Order);
        Self { events }
    }
}

impl SalesByHourView {
    fn hour_of(time: Timestamp) -> String {
        const HOUR_US: i64 = 3_600_000_000;
        let micros = time.as_unix_micros();
        Timestamp::from_unix_micros(micros - micros.rem_euclid(HOUR_US)).to_string()
    }

    async fn add(
        views: &mut ViewTx,
        hour: &str,
        lines: &[LineDocument],
        sign: i8,
    ) -> Result<(), HandlerError> {
        for line in lines {
            let key = format!("{hour}/{}", line.product_id);
            views
                .upsert("sales-by-hour", &key, |sales: &mut SalesDocument| {
                    sales.hour = hour.to_owned();
                    sales.product_id.clone_from(&line.product_id);
                    if sign > 0 {
                        sales.units += line.quantity;
                        sales.revenue_cents += line.total_cents;
                    } else {
                        sales.units = sales.units.saturating_sub(line.quantity);
                        sales.revenue_cents = sales.revenue_cents.saturating_sub(line.total_cents);
                    }
                })
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl TypedProjection for SalesByHourView {
    fn name(&self) -> &str {
        "sales-by-hour"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("sales-by-hour")
                .index("hour")
                .index("product_id")
                .index("revenue_cents"),
            CollectionSpec::new("sales-by-hour-orders"),
        ]
    }

    type Event = ShopEvent;

    fn events(&self) -> &EventSet<ShopEvent> {
        &self.events
    }

    async fn apply(
        &self,
        typed: ShopEvent,
        event: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        let ShopEvent::Order(order_event) = typed else {
            return Ok(());
        };
        match order_event {
            OrderEvent::OrderPlaced {
                order_id, lines, ..
            } => {
                let pending = PendingSale {
                    lines: lines.iter().map(LineDocument::from).collect(),
                    counted_in: None,
                };
                views.put("sales-by-hour-orders", &order_id, &pending)?;
            }
            OrderEvent::OrderConfirmed { order_id, .. } => {
                if let Some(mut pending) = views
                    .get::<PendingSale>("sales-by-hour-orders", &order_id)
                    .await?
                {
                    let hour = Self::hour_of(event.recorded_at);
                    Self::add(views, &hour, &pending.lines, 1).await?;
                    pending.counted_in = Some(hour);
                    views.put("sales-by-hour-orders", &order_id, &pending)?;
                }
            }
            OrderEvent::OrderCancelled { order_id, .. } => {
                let pending = views
                    .get::<PendingSale>("sales-by-hour-orders", &order_id)
                    .await?;
                if let Some(PendingSale {
                    lines,
                    counted_in: Some(hour),
                }) = pending
                {
                    Self::add(views, &hour, &lines, -1).await?;
                }
                views.delete("sales-by-hour-orders", &order_id)?;
            }
            OrderEvent::OrderRejected { order_id, .. } => {
                views.delete("sales-by-hour-orders", &order_id)?;
            }
        }
        Ok(())
    }
}
