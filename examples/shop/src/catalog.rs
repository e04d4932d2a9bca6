//! The catalog: products, their names, descriptions and prices.

use diptych::{Aggregate, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::Rejection;

/// `RegisterProduct`: adds a product to the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterProduct {
    /// The new product's id.
    pub product_id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its price, in cents.
    pub price_cents: u64,
}

/// `RenameProduct`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameProduct {
    /// The product.
    pub product_id: String,
    /// The new name.
    pub name: String,
}

/// `ChangePrice`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangePrice {
    /// The product.
    pub product_id: String,
    /// The new price, in cents.
    pub price_cents: u64,
}

/// What the catalog is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum CatalogCommand {
    /// See [`RegisterProduct`].
    Register(RegisterProduct),
    /// See [`RenameProduct`].
    Rename(RenameProduct),
    /// See [`ChangePrice`].
    ChangePrice(ChangePrice),
}

diptych::command!(
    RegisterProduct,
    id = product_id,
    aggregate = Product,
    into = CatalogCommand::Register
);
diptych::command!(
    RenameProduct,
    id = product_id,
    aggregate = Product,
    into = CatalogCommand::Rename
);
diptych::command!(
    ChangePrice,
    id = product_id,
    aggregate = Product,
    into = CatalogCommand::ChangePrice
);

/// What happened in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CatalogEvent {
    /// A product was added.
    ProductAdded {
        /// The product.
        product_id: String,
        /// Its name.
        name: String,
        /// Its description.
        description: String,
        /// Its price, in cents.
        price_cents: u64,
    },
    /// A product was renamed.
    ProductRenamed {
        /// The product.
        product_id: String,
        /// The new name.
        name: String,
    },
    /// A product's price changed.
    PriceChanged {
        /// The product.
        product_id: String,
        /// The new price, in cents.
        price_cents: u64,
    },
}

/// A product as the catalog knows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// Registered yet.
    pub exists: bool,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its price, in cents.
    pub price_cents: u64,
}

impl Aggregate for Product {
    const KIND: &'static str = "product";
    type Command = CatalogCommand;
    type Event = CatalogEvent;
    type Error = Rejection;

    fn decide(&self, command: &CatalogCommand) -> Result<Vec<CatalogEvent>, Rejection> {
        match command {
            CatalogCommand::Register(register) => {
                if self.exists {
                    return Err(Rejection::ProductExists);
                }
                let name = valid_name(&register.name)?;
                check_price(register.price_cents)?;
                Ok(vec![CatalogEvent::ProductAdded {
                    product_id: register.product_id.clone(),
                    name,
                    description: register.description.clone(),
                    price_cents: register.price_cents,
                }])
            }
            CatalogCommand::Rename(rename) => {
                self.check_exists()?;
                let name = valid_name(&rename.name)?;
                if self.name == name {
                    return Ok(vec![]);
                }
                Ok(vec![CatalogEvent::ProductRenamed {
                    product_id: rename.product_id.clone(),
                    name,
                }])
            }
            CatalogCommand::ChangePrice(change) => {
                self.check_exists()?;
                check_price(change.price_cents)?;
                if self.price_cents == change.price_cents {
                    return Ok(vec![]);
                }
                Ok(vec![CatalogEvent::PriceChanged {
                    product_id: change.product_id.clone(),
                    price_cents: change.price_cents,
                }])
            }
        }
    }

    /// A hot product's stream grows with every reservation (or rename): a
    /// snapshot every 50 events keeps loading it cheap.
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::Every(50)
    }

    fn evolve(&mut self, event: &CatalogEvent) {
        match event {
            CatalogEvent::ProductAdded {
                name,
                description,
                price_cents,
                ..
            } => {
                self.exists = true;
                self.name.clone_from(name);
                self.description.clone_from(description);
                self.price_cents = *price_cents;
            }
            CatalogEvent::ProductRenamed { name, .. } => self.name.clone_from(name),
            CatalogEvent::PriceChanged { price_cents, .. } => self.price_cents = *price_cents,
        }
    }
}

impl Product {
    fn check_exists(&self) -> Result<(), Rejection> {
        if self.exists {
            Ok(())
        } else {
            Err(Rejection::ProductNotFound)
        }
    }
}

fn valid_name(name: &str) -> Result<String, Rejection> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Rejection::Invalid {
            field: "name",
            reason: "must not be empty",
        });
    }
    Ok(name.to_owned())
}

fn check_price(price_cents: u64) -> Result<(), Rejection> {
    if price_cents == 0 {
        return Err(Rejection::Invalid {
            field: "price_cents",
            reason: "must be at least 1",
        });
    }
    Ok(())
}
