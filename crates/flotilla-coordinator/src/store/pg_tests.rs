//! The store suite on a throwaway PostgreSQL, and two coordinators racing on one.
