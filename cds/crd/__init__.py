"""Da Vinci CRD over CDS Hooks 2.0: the hook services, their prefetch and EHR queries, the coverage-information
extension and the cards. The HTTP edge is :mod:`cds.crd.http`; the work per order is :mod:`cds.crd.assess`."""
