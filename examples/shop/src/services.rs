//! The shop as four services, each with its own process, store and views.
//!
//! Each service takes its own context's commands and writes only its own
//! streams. What it needs of the others it keeps as copies of their streams in
//! its own log ([`diptych::StreamCopies`], fed through the broker), so the
//! domain code is the same as in one process: ordering prices an order from its
//! copy of the catalog's products, and its `customer-orders` view follows
//! renames from the copy. Nothing in a request waits on another service.
//!
//! The placement saga runs in the two services it commands: inventory reserves
//! and releases stock when ordering's events arrive, ordering confirms or
//! rejects when inventory's arrive. Each makes the same decisions from the same
//! events and sends only the commands for its own streams.

use std::fmt;

use diptych::Command;

use crate::catalog::{ChangePrice, RegisterProduct, RenameProduct};
use crate::customers::{RegisterCustomer, UpdateCustomerAddress};
use crate::inventory::AddStock;
use crate::ordering::{CancelOrder, PlaceOrder};

/// One of the shop's services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// Products, their names, descriptions and prices.
    Catalog,
    /// Stock and its reservations.
    Inventory,
    /// Customers and their addresses.
    Customers,
    /// Orders.
    Ordering,
}

impl Service {
    /// Every service, in the order they are started.
    pub const ALL: [Service; 4] = [
        Service::Catalog,
        Service::Inventory,
        Service::Customers,
        Service::Ordering,
    ];

    /// Its name, as in `serve --service catalog` and the broker's subjects.
    pub fn name(self) -> &'static str {
        match self {
            Service::Catalog => "catalog",
            Service::Inventory => "inventory",
            Service::Customers => "customers",
            Service::Ordering => "ordering",
        }
    }

    /// The service of this name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|service| service.name() == name)
    }

    /// The commands it takes.
    pub fn commands(self) -> &'static [&'static str] {
        match self {
            Service::Catalog => &[
                RegisterProduct::NAME,
                RenameProduct::NAME,
                ChangePrice::NAME,
            ],
            Service::Inventory => &[AddStock::NAME],
            Service::Customers => &[RegisterCustomer::NAME, UpdateCustomerAddress::NAME],
            Service::Ordering => &[PlaceOrder::NAME, CancelOrder::NAME],
        }
    }

    /// The service that takes `command`.
    pub fn of_command(command: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|service| service.commands().contains(&command))
    }

    /// The category of the streams it owns (`product` for `product-<id>`).
    pub fn category(self) -> &'static str {
        match self {
            Service::Catalog => "product",
            Service::Inventory => "stock",
            Service::Customers => "customer",
            Service::Ordering => "order",
        }
    }

    /// The services whose streams it keeps copies of, and why.
    pub fn sources(self) -> &'static [Service] {
        match self {
            // Stock on hand in the product listing.
            Service::Catalog => &[Service::Inventory],
            // Products must exist to be stocked; orders drive reservations.
            Service::Inventory => &[Service::Catalog, Service::Ordering],
            // Order counts and lifetime value.
            Service::Customers => &[Service::Ordering],
            // Names and prices, known customers, stock, and the saga's replies.
            Service::Ordering => &[Service::Catalog, Service::Customers, Service::Inventory],
        }
    }

    /// The views it serves.
    pub fn views(self) -> &'static [&'static str] {
        match self {
            Service::Catalog | Service::Inventory => &["products"],
            Service::Customers => &["customers"],
            Service::Ordering => &["orders", "customer-orders", "sales-by-hour"],
        }
    }

    /// Whether it runs the placement saga (for its own half of the commands).
    pub fn runs_placement(self) -> bool {
        matches!(self, Service::Inventory | Service::Ordering)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
